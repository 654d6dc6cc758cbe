"""tools/streaming/evaluate_ppl.py on tiny checkpoints: outputs, cache equivalences, errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from megatron.inference.options import ORIGINAL_DEFAULTS
from megatron.inference.perplexity import ppl_checkpoints
from tests.inference.fixtures import TEXT, write_checkpoint, write_hf_folder

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "evaluate_ppl", ROOT / "tools/streaming/evaluate_ppl.py"
)
evaluate_ppl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_ppl)

SEP = ["--enable_kv_cache_manager", "--enable_SepLLM", "--enable_pos_shift"]
SINK = ["--enable_kv_cache_manager", "--enable_SepLLM", "False", "--enable_StreamingLLM", "True"]
SIZES = [
    "--init_cache_size",
    "4",
    "--sep_cache_size",
    "8",
    "--local_size",
    "24",
    "--cache_size",
    "48",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    text = root / "text.txt"
    text.write_text(TEXT)
    return {
        "ours": write_checkpoint(root / "ours"),
        "hf": write_hf_folder(root / "hf"),
        "text": text,
    }


def run(models: dict[str, Path], out: Path, world: str, extra: list[str]) -> dict:
    argv = ["--model_name_or_path", str(models[world]), "--dataset_name", str(models["text"])]
    return evaluate_ppl.main([*argv, "--output_dir", str(out), *SIZES, *extra])


def test_short_stream_same_ppl_for_every_cache(models: dict[str, Path], tmp_path: Path) -> None:
    n = ["--num_eval_tokens", "40"]  # shorter than c = 48: nothing is evicted
    full = run(models, tmp_path / "full", "ours", [*n, "--enable_kv_cache_manager", "False"])
    sep = run(models, tmp_path / "sep", "ours", [*SEP, *n, "--chunk_size", "7"])
    sink = run(models, tmp_path / "sink", "ours", [*SINK, *n])
    assert full["num_tokens"] == 40
    assert sep["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    assert sink["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    for name in ("summary.json", "nll.txt", "ppl_checkpoints.json", "ppl.png"):
        assert (tmp_path / "sep" / name).is_file()
    nll = [float(x) for x in (tmp_path / "sep" / "nll.txt").read_text().split()]
    assert math.exp(sum(nll) / len(nll)) == pytest.approx(sep["ppl"], rel=1e-5)
    summary = json.loads((tmp_path / "sep" / "summary.json").read_text())
    assert summary["options"]["cache"] == "sep" and summary["peak_memory_bytes"] > 0
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["options"]["cache"] == (
        "full"
    )


def test_long_stream_both_worlds_agree_and_stay_bounded(
    models: dict[str, Path], tmp_path: Path
) -> None:
    n = ["--num_eval_tokens", "150"]
    ours = run(models, tmp_path / "a", "ours", [*SEP, *n, "--chunk_size", "16"])
    one = run(models, tmp_path / "b", "ours", [*SEP, *n])
    hf = run(models, tmp_path / "c", "hf", [*SEP, *n, "--chunk_size", "16"])
    assert ours["peak_cache_length"] <= 48 and 0 < ours["kept_kv_ratio"] < 1
    assert ours["ppl"] == pytest.approx(one["ppl"], rel=1e-5)  # chunks == token by token
    assert hf["ppl"] == pytest.approx(ours["ppl"], rel=1e-4)  # same weights, same policy


def test_ppl_checkpoints() -> None:
    marks = ppl_checkpoints([1.0] * 2500)
    assert list(marks) == ["1000", "2000", "2500"] and marks["2500"] == pytest.approx(math.e)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--enable_kv_cache_manager", "--enable_SepLLM", "--cache_size", "30"], "< cache_size"),
        (["--enable_SepLLM", "False"], "needs --enable_SepLLM"),
        (["--separator_token_ids", "13,9999"], "outside the vocabulary"),
    ],
)
def test_bad_options(models: dict[str, Path], tmp_path: Path, extra: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run(models, tmp_path, "ours", extra)
    assert not (tmp_path / "summary.json").exists()


def test_missing_inputs(models: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--output_dir", str(tmp_path / "o")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_ppl.main(
            [*argv, "--model_name_or_path", str(models["ours"]), "--dataset_name", "no.txt"]
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((models["hf"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        evaluate_ppl.main([*argv, "--model_name_or_path", str(empty), "--dataset_name", "bundled"])


def test_hub_dataset_offline_says_pass_a_local_file(
    models: dict[str, Path], tmp_path: Path
) -> None:
    argv = ["--model_name_or_path", str(models["ours"]), "--output_dir", str(tmp_path)]
    with pytest.raises(RuntimeError, match="local .txt"):
        evaluate_ppl.main([*argv, "--dataset_name", "emozilla/pg19-test"])


def test_original_command_runs_as_written(models: dict[str, Path], tmp_path: Path) -> None:
    """The original's command line (its demo scripts' flags, `--flag True/False`), small sizes
    and a local text file: SepCache with shift; without the flags, the original's defaults."""
    argv = ["--model_name_or_path", str(models["ours"]), "--dataset_name", str(models["text"])]
    original = [
        *["--init_cache_size", "4", "--sep_cache_size", "8", "--local_size", "24"],
        *["--cache_size", "48", "--enable_kv_cache_manager", "True", "--enable_SepLLM", "True"],
        *["--enable_StreamingLLM", "False", "--enable_pos_shift", "True"],
        *["--num_samples", "5000000", "--num_eval_tokens", "120", "--split", "test"],
    ]
    as_written = evaluate_ppl.main([*argv, *original, "--output_dir", str(tmp_path / "a")])
    bare = run(models, tmp_path / "b", "ours", [*SEP, "--num_eval_tokens", "120"])
    assert as_written["options"]["cache"] == "sep" and as_written["ppl"] == bare["ppl"]
    assert 0 < as_written["kept_kv_ratio"] < 1  # the cache evicted
    no_shift = run(models, tmp_path / "c", "ours", ["--enable_pos_shift", "False", *n_tokens()])
    assert no_shift["ppl"] != as_written["ppl"]  # keys keep their positions once evicted
    defaults = vars(evaluate_ppl.parse_args(argv))
    assert {k: defaults[k] for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS


def n_tokens() -> list[str]:
    return ["--num_eval_tokens", "120"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--enable_SepLLM"], True),
        (["--enable_SepLLM", "True"], True),
        (["--enable_SepLLM", "false"], False),
        (["--enable_SepLLM", "0"], False),
        ([], True),
    ],
)
def test_switch_syntax(flags: list[str], expected: bool) -> None:
    args = evaluate_ppl.parse_args(["--model_name_or_path", "m", *flags])
    assert args.enable_SepLLM is expected


def test_switch_value_must_be_boolean(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        evaluate_ppl.parse_args(["--model_name_or_path", "m", "--enable_pos_shift", "maybe"])
    assert "expected True or False, got 'maybe'" in capsys.readouterr().err
