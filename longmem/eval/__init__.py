"""Evaluation: scoring long documents with and without memory, and the paper's experiments."""
