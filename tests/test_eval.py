"""eval.py: lm-evaluation-harness on the local LAMBADA-style task, on one of our checkpoints
(the `sepneox` adapter, launched NeoX style through deepy.py) and on the same weights as a
transformers folder (lm-eval's `hf` backend): both must score the passages alike."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from megatron.eval.lambada import DATA_FILE, passages
from tests.conftest import run_cli
from tests.inference.fixtures import write_checkpoint, write_hf_folder

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)

LIMIT = 4  # passages per task: enough to compare the two backends, seconds on a CPU
FAST = ["--bootstrap_iters", "0"]  # no stderr bootstrap: the tests check values only


def _lambada(results: dict) -> dict:
    return results["results"]["shakespeare_lambada"]


def test_shipped_task_data_is_well_formed() -> None:
    rows = [json.loads(line) for line in DATA_FILE.read_text().splitlines()]
    assert len(rows) >= 50
    for r in rows:
        assert r["text"] == f"{r['context']} {r['target']}"
        assert r["target"].isalpha() and len(r["target"]) >= 3
    # The selection rule: last word after a space, and it occurs earlier in the passage.
    got = list(passages("Romeo. Where is Romeo gone?\nHe is gone, O " + "he " * 12 + "Romeo."))
    assert got and got[0]["target"] == "Romeo"


def test_eval_ours_via_deepy_and_hf_twin_agree(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ours")
    hf = write_hf_folder(tmp_path / "hf")
    cfg = tmp_path / "model.yml"
    cfg.write_text(yaml.safe_dump({"load": str(ckpt), "eval_num_fewshot": 0}))
    out = tmp_path / "ours.json"
    run_cli(
        ["deepy.py", "eval.py", str(cfg), "--eval_tasks", "shakespeare_lambada"]
        + ["--limit", str(LIMIT), "--output_path", str(out), *FAST]
    )
    ours = _lambada(json.loads(out.read_text()))
    twin = _lambada(
        eval_cli.main(
            ["--model_name_or_path", str(hf), "--tasks", "shakespeare_lambada"]
            + ["--limit", str(LIMIT), "--output_path", str(tmp_path / "hf_results"), *FAST]
        )
    )
    assert (tmp_path / "hf_results" / "results.json").is_file()
    assert 1.0 < ours["perplexity,none"] and math.isfinite(ours["perplexity,none"])
    assert 0.0 <= ours["acc,none"] <= 1.0
    assert ours["perplexity,none"] == pytest.approx(twin["perplexity,none"], rel=1e-3)
    assert ours["acc,none"] == twin["acc,none"]


def test_rolling_perplexity_task(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ours")
    res = eval_cli.main(
        [
            "--model_name_or_path",
            str(ckpt),
            "--tasks",
            "shakespeare_heldout_ppl",
            "--limit",
            "2",
            *FAST,
        ]
    )["results"]["shakespeare_heldout_ppl"]
    # A random char-level model: about the vocabulary's perplexity per byte (512 ids).
    assert 50 < res["byte_perplexity,none"] < 2000
    assert res["bits_per_byte,none"] == pytest.approx(math.log2(res["byte_perplexity,none"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model_name_or_path", "/nonexistent", "--tasks", "shakespeare_lambada"],
            "does not exist",
        ),
        (["--model_name_or_path", "."], "no tasks"),
        (["--tasks", "shakespeare_lambada"], "no model"),
    ],
)
def test_bad_input_fails_before_work(argv: list[str], message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        eval_cli.settings(argv)


def test_unknown_task_is_named(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ours")
    with pytest.raises(ValueError, match="unknown task.*shakespeare_lambada"):
        eval_cli.main(["--model_name_or_path", str(ckpt), "--tasks", "no_such_task"])
