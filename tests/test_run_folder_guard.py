"""The run-folder guard (tests/run_folder_guard) fails a test that writes to or reads from
the user's run folders, in process or in a child process, and passes one that uses tmp paths.
Run on a generated test file against a fake repository, so nothing real is touched."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT

CASES = """
import os, subprocess, sys
from pathlib import Path

REPO = Path(os.environ["SEPNEOX_TEST_GUARD_REPO"])

def test_writes_checkpoints():
    (REPO / "checkpoints" / "new.pt").write_bytes(b"x")

def test_reads_checkpoint_in_process():
    (REPO / "checkpoints" / "tiny" / "latest").read_text()

def test_child_resumes_from_user_checkpoint():
    # like tests/hf/test_main_job.py once did: a child (train.py) reads checkpoints/tiny, and
    # whatever the child does with the error, the test fails
    code = "import os\\ntry:\\n open('checkpoints/tiny/latest').read()\\nexcept OSError: pass"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

def test_lists_data_relative_to_cwd(monkeypatch):
    monkeypatch.chdir(REPO)
    try:
        os.listdir("data")
    except OSError:
        pass

def test_child_writes_runs():
    code = "import os; os.makedirs('runs/x')"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False)

def test_tmp_paths_pass(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("global_step2")
    code = "import sys; print(open(sys.argv[1]).read())"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "checkpoints" / "latest")],
                   check=True)
"""


def test_guard_fails_tests_that_touch_run_folders(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "checkpoints" / "tiny").mkdir(parents=True)
    (repo / "checkpoints" / "tiny" / "latest").write_text("global_step600")
    (repo / "data").mkdir()
    (repo / "runs").mkdir()
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "test_cases.py").write_text(textwrap.dedent(CASES))
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    env = {**os.environ, "SEPNEOX_TEST_GUARD_REPO": str(repo)}
    args = ["-m", "pytest", "-p", "tests.run_folder_guard.plugin", "-p", "no:cacheprovider"]
    args += ["-rA", "-q", "--rootdir", str(cases), "--basetemp", str(tmp_path / "inner")]
    args += [str(cases / "test_cases.py")]
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.splitlines()

    def verdicts(test: str) -> set[str]:
        return {ln.split()[0] for ln in lines if f"::{test}" in ln and ln.split()[0].isupper()}

    log = out.stdout[-6000:] + out.stderr[-2000:]
    assert verdicts("test_tmp_paths_pass") == {"PASSED"}, log
    caught = {
        "test_writes_checkpoints": "checkpoints/new.pt",
        "test_reads_checkpoint_in_process": "checkpoints/tiny/latest",
        "test_child_resumes_from_user_checkpoint": "checkpoints/tiny/latest",
        "test_lists_data_relative_to_cwd": "os.listdir " + str(repo / "data"),
        "test_child_writes_runs": "os.mkdir " + str(repo / "runs" / "x"),
    }
    for test in caught:
        assert "ERROR" in verdicts(test), (test, log)
        assert f"ERROR at teardown of {test}" in out.stdout, (test, log)
    assert out.stdout.count("this test touched the user's run folders") >= len(caught), log
    for path in caught.values():
        assert path in out.stdout, (path, log)
    # the accesses were stopped before they happened
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
