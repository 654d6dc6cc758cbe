"""Issue 22 (WEAK, checkpoints): a COMPLETE manifest listing no files is refused (it verified
silently); `latest` naming a missing directory says so (it was reported as "incomplete (no
COMPLETE marker)"); a save cut short by a full disk or a file size limit raises the
documented CheckpointError naming the checkpoint and the cause (it was torch's "unexpected
pos", with no path and no errno)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron.checkpoint.checksums import ChecksumError, verify_all_ranks
from megatron.checkpoint.layout import COMPLETE
from megatron.config.schema import CheckpointConfig
from megatron.training import checkpoint
from tests.conftest import run_cli


def test_manifest_listing_no_files_is_refused(tmp_path: Path) -> None:
    step = tmp_path / "global_step4"
    step.mkdir()
    (step / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (step / COMPLETE).write_text(json.dumps({"iteration": 4, "files": {}}))
    with pytest.raises(ChecksumError, match=rf"{step / COMPLETE} lists no files to verify"):
        verify_all_ranks(step, COMPLETE)


def test_latest_naming_a_missing_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "global_step2").mkdir()
    (tmp_path / "latest").write_text("global_step9")
    with pytest.raises(checkpoint.CheckpointError) as exc:
        checkpoint.find_tag(CheckpointConfig(load=str(tmp_path)))
    text = str(exc.value)
    assert f"names 'global_step9', but {tmp_path / 'global_step9'} does not exist" in text
    assert "global_step2" in text and "incomplete" not in text


SAVE_UNDER_A_SIZE_LIMIT = """
import resource, signal, sys, torch
from pathlib import Path
from megatron.training import checkpoint
root = Path(sys.argv[1]); out = root / "global_step3"; out.mkdir(parents=True)
(root / "latest").write_text("global_step2")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
try:
    with checkpoint._explain_os_error(root, out):
        torch.save(torch.zeros(1 << 16), out / "mp_rank_00_model_states.pt")
except checkpoint.CheckpointError as e:
    print(e)
"""


def test_save_cut_short_by_a_size_limit_names_the_checkpoint(tmp_path: Path) -> None:
    # A child process: the file size limit must not apply to the test runner itself.
    out = run_cli(["-c", SAVE_UNDER_A_SIZE_LIMIT, str(tmp_path)], timeout=120)
    text = out.stdout
    assert f"saving checkpoint {tmp_path / 'global_step3'} failed" in text, out.stderr[-2000:]
    assert "ENOSPC" in text and "EFBIG" in text and "MiB free on" in text
    assert "`latest` still names global_step2" in text
