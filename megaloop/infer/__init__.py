"""What users do with a trained model: evaluate it (loss, bits per byte, at any r) and sample
from it (with a KV cache). Checkpoints are read and models exported by export/."""
