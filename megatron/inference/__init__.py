"""Streaming inference: SepCache / sink / full caches for our models and transformers models
(docs/streaming.md)."""
