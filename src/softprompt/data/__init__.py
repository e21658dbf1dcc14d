"""Layer 4: generic record reading with one-line errors, and batching (features, collator, samplers)."""
