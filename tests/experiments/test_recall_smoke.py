"""The long-range recall benchmark in smoke mode (tools/experiments/run_recall.py --smoke),
one variant: every stage runs on the real configs with a tiny model; the outputs exist, the
accuracies are fractions of the queries the generator wrote, and SepCache holds the
separators of facts whose tokens it evicted (what makes it answerable), the sink cache
holds far fewer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.recall import CLOSE, SEP

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "experiments"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import run_recall

    out = tmp_path_factory.mktemp("recall")
    assert run_recall.main(["--out", str(out), "--smoke", "--variants", "sepllm_w"]) == 0
    return out


def test_data_and_checkpoints(run: Path) -> None:
    sep, nosep = (MMapIndexedDataset(str(run / "data" / f"{k}_train")) for k in ("sep", "nosep"))
    assert len(sep) == len(nosep) == 4 * 2 + 1  # train_iters x micro batch + 1 (smoke)
    a, b = sep[0], nosep[0]
    assert (a == SEP).sum() > 0 and ((a == SEP) == (b == CLOSE)).all() and not (b == SEP).any()
    for step in (2, 4):
        assert (run / "ckpt" / "sepllm_w" / f"global_step{step}" / "COMPLETE").is_file()


def test_measured_accuracies(run: Path) -> None:
    import recall_measure

    r = json.loads((run / "results" / "sepllm_w.json").read_text())
    assert [c["step"] for c in r["curve"]] == [2, 4]
    for c in r["curve"]:
        parts = sum(c[k]["n"] for k in ("near", "mid", "far"))
        assert parts == c["all"]["n"] == sum(b["n"] for b in c["by_segments"]) > 0
        assert 0.0 <= c["all"]["acc"] <= 1.0 and c["loss"] > 0
    assert r["heldout_sequences"] == recall_measure.HELDOUT_SEQS[True]
    results = json.loads((run / "results.json").read_text())
    assert set(results["runs"]) == {"sepllm_w"}
    assert (run / "plots" / "recall_heldout.png").is_file()
    assert (run / "plots" / "recall_streaming.png").is_file()
    assert "Targets" in (run / "recall.md").read_text()


def test_sepcache_holds_separators_of_evicted_facts(run: Path) -> None:
    s = json.loads((run / "results" / "stream.json").read_text())
    sep, sink = s["sepllm_w__sep"], s["sepllm_w__sink"]
    assert sep["all"]["n"] == sink["all"]["n"] > 0  # the same queries through both caches
    only_sep = sep["held"]["only_sep_held"]["n"]
    assert only_sep > 0 and only_sep > 2 * sink["held"]["only_sep_held"]["n"]
    # The sink cache keeps a contiguous recent span: a fact is held whole or not at all,
    # except when the span starts between its value and separator.
    assert sink["held"]["neither_held"]["n"] > sep["held"]["neither_held"]["n"]
