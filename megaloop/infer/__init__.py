"""What users do with a trained model: evaluate it (loss, bits per byte, at any r) and sample
from it (with a KV cache). Checkpoint reading and export live in train/export.py."""
