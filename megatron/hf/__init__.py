"""Hugging Face interop: key maps (adapters), configs both ways (configs), transformers folders
(export) and SepLLM attention for stock transformers (sepllm_attention; importing it registers
attn_implementation="sepllm"). The command-line tools are in tools/ckpts; see docs/hf.md."""
