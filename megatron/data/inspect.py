"""Human-readable summary of an indexed dataset (used by tools/datasets/inspect_data.py)."""

from __future__ import annotations

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.tokenizers import make_tokenizer


def inspect_dataset(
    prefix: str,
    tokenizer_type: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    doc: int | None = None,
    sample: int | None = None,
    seq_length: int = 2048,
    seed: int = 1234,
    max_tokens: int | None = None,
    scan: bool = False,
    errors: list[str] | None = None,
) -> str:
    """The summary text; problems found (`scan`: token ids the vocabulary cannot embed) are
    also appended to `errors`, so a CLI can exit non-zero on them."""
    ds = MMapIndexedDataset(prefix)
    sizes = ds.sizes
    lines = [
        f"dataset: {prefix}",
        f"dtype: {np.dtype(ds.dtype)}",
        f"documents: {len(ds.doc_idx) - 1}",
        f"sequences: {len(ds)}",
        f"tokens: {ds.num_tokens}",
    ]
    if len(sizes):
        lines.append(
            f"tokens/document: min {sizes.min()}, mean {sizes.mean():.1f}, max {sizes.max()}"
        )
    need_tok = doc is not None or sample is not None or scan
    tok = (
        make_tokenizer(tokenizer_type or "HFTokenizer", vocab_file, merge_file)
        if need_tok
        else None
    )
    if scan and tok is not None:
        top = ds.max_token()
        status = "OK" if top < tok.vocab_size else "ERROR: exceeds the tokenizer vocabulary"
        if top >= tok.vocab_size and errors is not None:
            errors.append(f"{prefix}: max token id {top} >= tokenizer vocab {tok.vocab_size}")
        lines.append(f"max token id: {top} (tokenizer vocab {tok.vocab_size}) {status}")
    if doc is not None and tok is not None:
        if not 0 <= doc < len(ds):
            raise IndexError(f"{prefix}: document {doc} out of range [0, {len(ds)})")
        ids = ds[doc][:max_tokens]
        lines += [f"--- document {doc} ({len(ds[doc])} tokens) ---", tok.detokenize(ids.tolist())]
    if sample is not None and tok is not None:
        from megatron.data.gpt_dataset import GPTDataset

        g = GPTDataset("inspect", ds, np.arange(len(ds)), sample + 1, seq_length, seed)
        ids = g[sample]["text"][:max_tokens]
        lines += [
            f"--- sample {sample} (seq_length {seq_length}, seed {seed}) ---",
            tok.detokenize(ids.tolist()),
        ]
    return "\n".join(lines)
