"""Fail any test that reads or writes the user's run folders under the repository root.

A user who ran the README's main job has checkpoints/tiny and data/shakespeare; a test that
resolves a shipped config's relative `load:` against the repository would resume from them
(tests/hf/test_main_job.py once did). Every open, listing, mkdir, remove or rename of a path
there by Python, in the test process and in every Python process it starts (audit hooks,
see sitecustomize.py beside this file), fails the access and the test, naming the path.
Not a snapshot of the folders' trees: a run the user has going in the same checkout would
fail whichever test ran at the time. Non-Python programs a test starts (sh, cp) are not seen.

tests/conftest.py imports these hooks; `-p tests.run_folder_guard.plugin` runs them alone
(tests/test_run_folder_guard.py does, on a generated test file and a fake repository).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.run_folder_guard.sitecustomize import LOG_ENV, ROOTS_ENV, make_hook

FOLDERS = ("checkpoints", "data", "runs", "hf", "ckpts", "outputs")
# Tests of the guard itself point it at a fake repository.
REPO_ENV = "SEPNEOX_TEST_GUARD_REPO"
HERE = Path(__file__).resolve().parent


class Guard:
    def __init__(self, repo: Path) -> None:
        self.roots = tuple(str(repo / name) for name in FOLDERS)
        self.hits: list[str] = []  # filled by this process's hook
        fd, self.log = tempfile.mkstemp(prefix="run-folder-guard-", suffix=".log")
        os.close(fd)  # filled by the hooks of child processes

    def problems(self) -> list[str]:
        """What was touched since the last call (then starts afresh)."""
        found = list(self.hits)
        self.hits.clear()  # the hook holds this list
        with open(self.log) as f:
            found += [line.rstrip() for line in f]
        open(self.log, "w").close()
        return found


GUARD = pytest.StashKey[Guard]()


def pytest_configure(config: pytest.Config) -> None:
    repo = Path(os.environ.get(REPO_ENV) or HERE.parent.parent)
    guard = Guard(repo)
    config.stash[GUARD] = guard
    # Every Python process a test starts inherits these and installs the same hook.
    os.environ[ROOTS_ENV] = os.pathsep.join(guard.roots)
    os.environ[LOG_ENV] = guard.log
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *[p for p in paths if p != str(HERE)]])
    sys.addaudithook(make_hook(guard.roots, guard.hits.append))


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.stash.get(GUARD, None)
    if guard is not None:
        Path(guard.log).unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _run_folders_untouched(request: pytest.FixtureRequest):
    """Fails the test (at teardown) that touched a run folder; session fixtures' accesses are
    reported by the first test that used them."""
    yield
    found = request.config.stash[GUARD].problems()
    if found:
        pytest.fail(
            "this test touched the user's run folders (tests must use tmp paths):\n  "
            + "\n  ".join(dict.fromkeys(found)),
            pytrace=False,
        )
