"""SQuAD v1.1 / MRQA question answering: T5's own `squad` text (`text`) and the QA readers and their
tokenization (`reader`)."""
