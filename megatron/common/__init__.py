"""Leaf helpers shared by every package (imports nothing from megatron)."""
