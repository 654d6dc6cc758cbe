"""A LAMBADA-style last-word task from held-out passages of the bundled Shakespeare corpus.

LAMBADA scores the last word of a passage (with its leading space) given the rest, by
accuracy (the greedy continuation is exactly the word) and perplexity. Our passages are the
speeches (blank-line separated paragraphs) of the validation documents of configs/tiny.yml's
and configs/experiments/base.yml's split, so no model trained on the training split saw them.
As in LAMBADA's selection, the target is a word that already occurs earlier in the passage
(it can be inferred from the context, not only from the last sentence), has >= 3 letters,
and follows a space (not a line break) so the context / target split is unambiguous.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from megatron.common.files import atomic_write_text
from megatron.data.builder import split_boundaries
from megatron.data.bundled import shakespeare_files

TASK_DIR = Path(__file__).resolve().parent / "tasks"
DATA_FILE = TASK_DIR / "shakespeare_lambada.jsonl"
DEFAULT_SPLIT = "949,50,1"  # configs/tiny.yml and configs/experiments/base.yml
_LAST_WORD = re.compile(r"(?<= )([A-Za-z]{3,})[.,;:!?'\"]*$")


def heldout_texts(split: str = DEFAULT_SPLIT) -> list[str]:
    """The corpus' validation documents (one per work, in dataset order) for `split`."""
    files = shakespeare_files()
    _, train_end, valid_end, _ = split_boundaries(split, len(files))
    if valid_end <= train_end:
        raise ValueError(f"split {split!r} leaves no validation documents")
    return [
        Path(p).read_text(encoding="utf-8", errors="replace") for p in files[train_end:valid_end]
    ]


def passages(text: str, min_words: int = 15, max_words: int = 150) -> Iterator[dict[str, str]]:
    """{"context", "target", "text"} records, one per qualifying paragraph."""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        words = para.split()
        if not min_words <= len(words) <= max_words:
            continue
        m = _LAST_WORD.search(para)
        if m is None:
            continue
        target, context = m.group(1), para[: m.start(1) - 1]
        if target.lower() not in {w.strip(".,;:!?'\"").lower() for w in context.split()}:
            continue  # LAMBADA-like: the word is recoverable from the passage
        yield {"context": context, "target": target, "text": f"{context} {target}"}


def build(out: Path = DATA_FILE, split: str = DEFAULT_SPLIT, limit: int | None = None) -> int:
    """Write the task's jsonl (atomically); returns the number of passages."""
    records = [r for t in heldout_texts(split) for r in passages(t)]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError("no passage qualified; check the corpus (shksprdata)")
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def resolved_task_dir(dest: Path, data_file: Path = DATA_FILE, names: Sequence[str] = ()) -> Path:
    """Copies of the shipped task YAMLs into `dest` with the data file's absolute path, so
    lm-eval finds the data from any working directory (datasets resolves relative
    `data_files` against the current directory)."""
    dest.mkdir(parents=True, exist_ok=True)
    for yml in sorted(TASK_DIR.glob("*.yaml")):
        if names and yml.stem not in names:
            continue
        text = yml.read_text().replace(
            "megatron/eval/tasks/shakespeare_lambada.jsonl", str(data_file)
        )
        (dest / yml.name).write_text(text)
    return dest
