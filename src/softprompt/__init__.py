"""softprompt: prompt tuning (Lester, Al-Rfou & Constant, 2021) and fine-tuning of T5 for question answering."""

__version__ = "0.1.0"
