"""Layer 6: the frozen T5 with soft prompts (PromptedT5, SoftPrompt, PromptTable), the lean T5 path, optimizers."""
