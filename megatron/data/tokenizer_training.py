"""Train a byte-level BPE (HF tokenizers) or SentencePiece tokenizer on text / jsonl files.

Both reserve ``<|endoftext|>`` (EOD) and ``<|padding|>`` (pad); for BPE they are ids 0 and 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from megatron.common.files import atomic_path
from megatron.data.readers import iter_documents
from megatron.data.tokenizers import EOD_TOKEN, PAD_TOKEN


def iter_texts(files: list[str], json_key: str = "text") -> Iterator[str]:
    """Documents of the input files (.txt: one per file; .jsonl[.gz|.zst]: ``json_key``)."""
    for path in files:
        if path.endswith((".txt", ".text")):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
        else:
            for doc in iter_documents(path, json_key):
                if doc.text:
                    yield doc.text


def train_bpe(
    files: list[str], out_path: str, vocab_size: int = 8192, json_key: str = "text"
) -> str:
    """Byte-level BPE like GPT-2/NeoX; writes tokenizer.json atomically and returns its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_inputs(files)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(files, json_key), trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_path(out_path) as tmp:
        tok.save(tmp)
    return out_path


def train_spm(
    files: list[str],
    model_prefix: str,
    vocab_size: int = 8192,
    json_key: str = "text",
    model_type: str = "bpe",
) -> str:
    """SentencePiece with byte fallback and no normalisation, so text round-trips exactly."""
    import sentencepiece as spm

    _check_inputs(files)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    # SentencePiece trains on sentences; feed it lines (its per-sentence length cap is 4192).
    lines = (ln for t in iter_texts(files, json_key) for ln in t.splitlines() if ln.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=-1,
        eos_id=1,
        pad_id=2,
        eos_piece=EOD_TOKEN,
        pad_piece=PAD_TOKEN,
        user_defined_symbols=["\n", "\t"],
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model_prefix + ".model"


def export_gpt2_files(tokenizer_json: str, out_dir: str) -> tuple[str, str]:
    """Write vocab.json + merges.txt (GPT-2 format) from a byte-level BPE tokenizer.json."""
    with open(tokenizer_json, encoding="utf-8") as f:
        model = json.load(f)["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_json}: not a BPE model (type {model.get('type')!r})")
    os.makedirs(out_dir, exist_ok=True)
    vocab_path = os.path.join(out_dir, "vocab.json")
    merges_path = os.path.join(out_dir, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    return vocab_path, merges_path


def _check_inputs(files: list[str]) -> None:
    if not files:
        raise ValueError("no input files to train the tokenizer on")
    for p in files:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tokenizer training input {p!r} does not exist")
