"""Layer 7: generation and rank classification over many prompts on one model (the bank, ensembles)."""
