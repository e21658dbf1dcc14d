"""SQuAD v1.1 / MRQA question answering: T5's own `squad` text and the QA readers."""
