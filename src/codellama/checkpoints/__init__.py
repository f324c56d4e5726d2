"""Checkpoint formats: Hugging Face (hf.py), Meta (meta.py), GGUF (gguf.py), and format detection (load.py)."""
