"""What users do with a trained model: evaluate it (loss, bits per byte, at any r) and sample
from it (with a KV cache). A checkpoint's model is loaded by export/weights.py, which reads the
files through megaloop/ckpt/, never through the trainer; models are exported by export/."""
