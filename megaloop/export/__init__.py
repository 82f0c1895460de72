"""Trained models out of megaloop: consolidated weights (weights.py), the transformers folder
(hf.py: Llama where Llama can express the model, llama.py; else MegaloopForCausalLM, whose
modeling files remote_code.py generates from the model's own source)."""
