"""No code path unpickles a checkpoint with torch.load(weights_only=False) except the one
explicit opt-in (`allow_unsafe_checkpoint_load`) in megatron/checkpoint/safe_load.py.

The scan parses every Python file of the repository (so a call split over lines, or written
with the keyword in any position, is still one ast.Call) and flags every call of a `load`
attribute / name that passes `weights_only` as anything but the literal True, and every
`pickle.load(s)` on a file.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPT_IN = ROOT / "megatron" / "checkpoint" / "safe_load.py"
SKIP = {".git", ".venv", "build", "node_modules", "__pycache__"}
USER_FOLDERS = {"checkpoints", "data", "runs", "hf", "outputs", "ckpts"}  # top level: not ours


def unsafe_loads(source: str, filename: str = "<string>") -> list[int]:
    """Line numbers of calls that may unpickle arbitrary objects."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        if owner == "pickle" and name in ("load", "loads"):
            found.append(node.lineno)
        for kw in node.keywords:
            literal_true = isinstance(kw.value, ast.Constant) and kw.value.value is True
            if kw.arg == "weights_only" and not literal_true:
                found.append(node.lineno)
    return found


def python_files() -> list[Path]:
    out = []
    for here, dirs, files in os.walk(ROOT):
        top = Path(here) == ROOT
        dirs[:] = [d for d in dirs if d not in SKIP and not (top and d in USER_FOLDERS)]
        out += [Path(here) / f for f in files if f.endswith(".py")]
    return [p for p in out if p != OPT_IN]


def test_the_scan_sees_multi_line_and_indirect_calls() -> None:
    sample = (
        "import torch, pickle\n"
        "a = torch.load(\n    'x.pt',\n    map_location='cpu',\n    weights_only=False,\n)\n"
        "flag = False\nb = torch.load('y.pt', weights_only=flag)\n"
        "c = pickle.loads(b'')\n"
        "d = torch.load('z.pt', weights_only=True)\n"
    )
    assert unsafe_loads(sample) == [2, 8, 9]


def test_no_unsafe_load_outside_the_opt_in() -> None:
    offenders = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in python_files()
        for line in unsafe_loads(p.read_text(), str(p))
    ]
    assert offenders == [], "torch.load with weights_only not True (use safe_load.load_file)"


def test_the_opt_in_is_the_one_place() -> None:
    """The opt-in path is still there and is the only unsafe load (guards the exemption)."""
    assert unsafe_loads(OPT_IN.read_text()) != []
