"""Hugging Face interop: explicit state-dict key maps for GPT-NeoX and Llama."""
