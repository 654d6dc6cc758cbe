"""SepLLM: separator-compressed sparse attention (kept set, kernels, statistics)."""
