"""Layer 1: the choice lists, the flag field types, the shared flag groups and the one parser."""
