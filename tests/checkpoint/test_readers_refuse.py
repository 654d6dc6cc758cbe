"""Every reader of our checkpoints refuses what it must not use, naming the file: generate.py,
tools/streaming/evaluate_ppl.py, eval.py's sepneox adapter and the HF export, all through
open_checkpoint. Cases: a pickle payload that would run code (checksums rewritten to match,
as an attacker with write access would), bit rot, no COMPLETE marker, a missing file, a
truncated file; and the trainer's opt-out key turns the checksum check off, not the rest."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from megatron.checkpoint import (
    READ_ERRORS,
    CheckpointLoadError,
    CheckpointRefused,
    ChecksumError,
)
from megatron.checkpoint.checksums import write_complete
from megatron.checkpoint.layout import COMPLETE, model_states_file
from megatron.checkpoint.safe_load import load_file
from megatron.hf.export import export_checkpoint
from tests.inference.fixtures import TEXT, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_cli = _module("generate_cli_21", "generate.py")
evaluate_ppl = _module("evaluate_ppl_21", "tools/streaming/evaluate_ppl.py")


class Payload:
    """Unpickling this creates `marker` (harmless stand-in for os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _generate(ckpt: Path, tmp: Path, extra: list[str]) -> object:
    out = ["--sample_output_file", str(tmp / "gen.jsonl")]
    argv = ["--model_name_or_path", str(ckpt), "--prompt", "To be", "--maximum_tokens", "2"]
    return generate_cli.main([*argv, *out, *extra])


def _streaming_ppl(ckpt: Path, tmp: Path, extra: list[str]) -> object:
    text = tmp / "text.txt"
    text.write_text(TEXT)
    argv = ["--model_name_or_path", str(ckpt), "--dataset_name", str(text)]
    out = ["--output_dir", str(tmp / "ppl"), "--num_eval_tokens", "8"]
    return evaluate_ppl.main([*argv, *out, *extra])


def _lm_eval(ckpt: Path, tmp: Path, extra: list[str]) -> object:
    from megatron.eval.lm import SepneoxLM

    verify = "false" if "false" in extra else "true"
    return SepneoxLM(path=str(ckpt), verify_checkpoint_checksums=verify)


def _export(ckpt: Path, tmp: Path, extra: list[str]) -> object:
    from megatron.checkpoint import ReadOptions

    options = ReadOptions(verify_checkpoint_checksums="false" not in extra)
    return export_checkpoint(ckpt, tmp / "hf", skip_tokenizer=True, options=options)


TOOLS: dict[str, Callable[[Path, Path, list[str]], object]] = {
    "generate": _generate,
    "evaluate_ppl": _streaming_ppl,
    "eval": _lm_eval,
    "export": _export,
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pristine") / "ckpt")


@pytest.fixture
def ckpt(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _weights(ckpt: Path) -> Path:
    return ckpt / "global_step1" / model_states_file(0)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_pickle_payload_is_refused_and_never_runs(tool: str, ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    state = load_file(_weights(ckpt))
    torch.save({**state, "extra": Payload(marker)}, _weights(ckpt))
    write_complete(ckpt / "global_step1", COMPLETE, 1)  # checksums match the tampered file
    refused = f"refused to load checkpoint file .*{_weights(ckpt).name}"
    with pytest.raises(CheckpointLoadError, match=refused):
        TOOLS[tool](ckpt, tmp_path, [])
    assert not marker.exists()


def _bit_rot(ckpt: Path) -> None:
    data = bytearray(_weights(ckpt).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _weights(ckpt).write_bytes(bytes(data))


def _truncate(ckpt: Path) -> None:
    data = _weights(ckpt).read_bytes()
    _weights(ckpt).write_bytes(data[: len(data) // 2])


def _unknown_key(ckpt: Path) -> None:
    """A config.yml key no version of ours writes (a typo), checksums rewritten to match:
    refused by the strict parse instead of silently dropped."""
    step = ckpt / "global_step1"
    config = step / "config.yml"
    config.write_text(config.read_text().replace("model:\n", "model:\n  hiden_size: 64\n", 1))
    write_complete(step, COMPLETE, 1)


def _unmark(ckpt: Path) -> None:
    (ckpt / "global_step1" / COMPLETE).unlink()


CASES = {
    "bit_rot": (_bit_rot, ChecksumError, "differs from what was written"),
    "no_complete": (
        lambda c: (c / "global_step1" / COMPLETE).unlink(),
        CheckpointRefused,
        "no COMPLETE",
    ),  # fmt: skip
    "missing_file": (lambda c: _weights(c).unlink(), ChecksumError, "is missing"),
    "truncated": (_truncate, ChecksumError, "truncated"),
    "unknown_config_key": (_unknown_key, CheckpointRefused, "config.yml.*hiden_size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_damaged_checkpoint_is_refused_naming_the_file(
    tool: str, case: str, ckpt: Path, tmp_path: Path
) -> None:
    damage, error, message = CASES[case]
    damage(ckpt)
    with pytest.raises(error, match=message):
        TOOLS[tool](ckpt, tmp_path, [])


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_opt_out_skips_checksums_but_not_the_reader(tool: str, ckpt: Path, tmp_path: Path) -> None:
    """--verify_checkpoint_checksums false: a truncated file is still refused by the
    weights-only reader, naming it (and not as a checksum mismatch)."""
    _truncate(ckpt)
    with pytest.raises(READ_ERRORS, match=_weights(ckpt).name) as err:
        TOOLS[tool](ckpt, tmp_path, ["--verify_checkpoint_checksums", "false"])
    assert not isinstance(err.value, ChecksumError)
