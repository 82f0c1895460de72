"""The checkpoint on disk, in a room of its own: its layout and marker (layout.py), reading its
files without code (reading.py) and DeepSpeed's ZeRO files as whole weights (zero.py). The
trainer writes through it, export and inference read through it; it imports neither them nor
DeepSpeed."""
