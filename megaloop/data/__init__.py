"""Data: document sources, the tokenizer, token shards and the loader."""
