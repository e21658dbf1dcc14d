"""Layer 4: generic record reading with one-line errors (`records`), tokenized features and their batching
(`batching`: collator, samplers, sharding), and the seeded synthetic corpus (`synthetic`)."""
