"""Text-to-text tasks from templates: the task spec and its examples (spec), where a task comes from
(presets: ``configs/tasks`` presets, task YAML files, flags), reading its rows (reader: JSONL/CSV/TSV and
Hugging Face datasets) and tokenizing its examples for T5 (features)."""
