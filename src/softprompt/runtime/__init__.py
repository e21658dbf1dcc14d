"""Layer 2: what runs beside the model: processes (torchrun, DDP, FSDP2) and the progress display."""
