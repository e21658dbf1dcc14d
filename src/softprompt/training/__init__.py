"""Layer 8: `softprompt train` in phases (setup, loop, evaluation, saving), its config, state, logs, report, card."""
