"""Evaluation with lm-evaluation-harness: a model adapter over our GPTModel checkpoints
(`lm.py`), local LAMBADA-style tasks built from held-out text (`lambada.py`, `tasks/`), and
the run that `eval.py` drives (`harness.py`). docs/results.md shows it on the study's runs."""
