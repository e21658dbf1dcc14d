"""Layer 5: what a task is: SQuAD and text-to-text tasks, their record layouts and their metrics."""
