"""The metrics: the official SQuAD v1.1 EM/F1 and the text tasks' metrics as T5 computes them."""
