"""Hugging Face interop: key maps (adapters), configs both ways (configs), strict reading of
transformers folders (folder), our checkpoint -> a transformers folder (export), a
transformers folder -> our checkpoint (importer), tokenizer files (tokenizer) and SepLLM
attention for stock transformers (sepllm_attention; importing it registers
attn_implementation="sepllm"). The command-line tools are thin, in tools/ckpts; docs/hf.md."""
