"""Text-to-text tasks from templates: TaskSpec, row readers and presets."""
