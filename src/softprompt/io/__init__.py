"""Layer 3: files on disk: atomic writes, the run directory, prompt and PEFT files, pretrained weights."""
