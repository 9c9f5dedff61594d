"""Shards -> samples -> batches. Knows nothing of models: a tokenizer is passed in.

Note: this package shadows the Hugging Face `datasets` package name on purpose; never depend on that one.
"""
