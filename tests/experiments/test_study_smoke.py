"""The SepLLM study in smoke mode (tools/experiments/run_study.py --smoke): every stage runs
on the real configs with a tiny model, and every output file exists with sane values; a
second run skips what is done."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "experiments"))

VARIANTS = ("vanilla", "streamingllm_w", "sepllm_w", "sepllm_2w", "sepllm_ht")
# (width, height) in pixels: figsize x study_plots.DPI (90).
PNG_SIZES = {
    "loss_curves.png": (630, 360),
    "streaming_ppl.png": (990, 378),
    "cache_length.png": (630, 360),
    "attention_pattern.png": (675, 630),
    "speedup.png": (540, 360),
}
# The printed table of benchmarks/sepllm_training.py, shape only (made-up numbers): the plot
# reads the speed-up column of the w rows.
BENCH_TABLE = """\
   seq     w   kernel   ms/iter speed-up   cpu ms  cpu x  peak MB   kept kept-KV
  2048  full   causal     100.0    1.00x     90.0  1.00x     10.0  1.000   1.000
  2048    64  compact      80.0    1.25x     70.0  1.28x     12.0  0.180   0.100
  4096    64  compact     150.0    1.50x    140.0  1.40x     12.0  0.150   0.080
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    bench = out / "bench.txt"
    bench.write_text(BENCH_TABLE)
    data = out / "data"  # the corpus is built here, never in the user's data/
    run_cli(
        [
            "tools/experiments/run_study.py",
            *("--out", str(out), "--smoke", "--benchmark", str(bench)),
            *("--set", f"data_path={data / 'shakespeare_text_document'}"),
            *("--set", f"vocab_file={data / 'tokenizer.json'}"),
        ],
        timeout=900,
    )
    return out


def test_every_run_trained_and_measured(study: Path) -> None:
    results = json.loads((study / "results.json").read_text())
    assert set(results["runs"]) == set(VARIANTS)
    for name, r in results["runs"].items():
        assert (study / "ckpt" / name / "global_step4" / "COMPLETE").is_file()
        assert (study / "hf" / name / "config.json").is_file()
        assert 1.0 < r["valid_ppl"] < 2 * 8192, name  # a 4-step model: near uniform, finite
        assert r["hf_valid_ppl"] == pytest.approx(r["valid_ppl"], rel=1e-3), name
        assert 0.0 < r["density"] <= 1.0 and 0.0 < r["kv_ratio"] <= 1.0, name
        assert r["ms_per_iter"] > 0 and len(r["train_loss"]) >= 2, name
    dense = results["runs"]["vanilla"]
    assert dense["density"] == 1.0 and dense["kv_ratio"] == 1.0
    sparse = results["runs"]
    # Fewer kept pairs with a smaller window and without separators; H/T keeps more.
    assert sparse["streamingllm_w"]["density"] < sparse["sepllm_w"]["density"]
    assert sparse["sepllm_w"]["density"] < sparse["sepllm_2w"]["density"] < 1.0
    assert sparse["sepllm_w"]["density"] < sparse["sepllm_ht"]["density"] < 1.0
    assert set(results["lmeval"]) == set(VARIANTS)  # eval.py's task on every run
    for name, r in results["lmeval"].items():
        assert 0.0 <= r["acc,none"] <= 1.0 and math.isfinite(r["perplexity,none"]), name
    free = results["training_free"]
    for key in ("sepllm_w", "sepllm_2w", "streamingllm_w"):
        assert math.isfinite(free[key]["valid_ppl"]) and free[key]["valid_ppl"] > 1.0
    assert free["sepllm_w"]["hf_valid_ppl"] == pytest.approx(
        free["sepllm_w"]["valid_ppl"], rel=1e-3
    )


def test_streaming_results(study: Path) -> None:
    import measure

    results = json.loads((study / "results.json").read_text())
    streams = results["streaming"]
    assert set(streams) == {j.key for j in measure.stream_jobs(True)}
    sizes = measure.cache_sizes(True)
    for key, s in streams.items():
        assert math.isfinite(s["ppl"]) and s["ppl"] > 1.0, key
        assert s["num_tokens"] == 2 * 128, key  # 2 x seq_length held-out tokens in smoke mode
        assert len((study / "streaming" / key / "nll.txt").read_text().split()) == s["num_tokens"]
        if s["options"]["cache"] == "full":
            assert s["peak_cache_length"] == s["num_tokens"], key
        else:  # compressed after each chunk: never more than c once a chunk is done
            assert s["peak_cache_length"] <= sizes["capacity"], key
            assert all(length <= sizes["capacity"] for _, length in s["lengths"]), key
            assert 0.0 < s["kept_kv_ratio"] < 1.0, key


def test_report_and_plots(study: Path) -> None:
    from matplotlib.image import imread

    md = (study / "results.md").read_text()
    headings = ("## Training", "## lm-eval", "## Training-free", "## Streaming", "## Plots")
    for heading in headings:
        assert heading in md
    for name, (w, h) in PNG_SIZES.items():
        img = imread(study / "plots" / name)
        assert img.shape[:2] == (h, w), name
        assert img.std() > 0.01, name  # something was drawn
        assert f"plots/{name}" in md
    times = json.loads((study / "timings.json").read_text())
    assert {f"train/{v}" for v in VARIANTS} <= set(times)
    assert all(t >= 0 for t in times.values())


def test_rerun_skips_finished_work(study: Path) -> None:
    proc = run_cli(
        ["tools/experiments/run_study.py", "--out", str(study), "--smoke"]
        + ["--stages", "train", "convert", "stream"]
    )
    assert proc.stdout.count("done already") == 2 * len(VARIANTS) + len(
        json.loads((study / "results.json").read_text())["streaming"]
    )


def test_bad_input_is_refused_before_work(tmp_path: Path) -> None:
    import run_study

    missing = tmp_path / "none.json"
    assert run_study.main(["--out", str(tmp_path / "o"), "--benchmark", str(missing)]) == 2
    assert not (tmp_path / "o").exists()
