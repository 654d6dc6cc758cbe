"""Repository contracts: the README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    cmds = _readme_commands()
    install = next(c for c in cmds if c.startswith("pip install"))
    test = next(c for c in cmds if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def test_readme_main_job_config_exists() -> None:
    main_job = next(c for c in _readme_commands() if c.startswith("python deepy.py"))
    for token in main_job.split():
        if token.endswith((".yml", ".py")):
            assert (ROOT / token).is_file(), token
