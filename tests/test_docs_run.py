"""Every command and snippet in README.md and docs/*.md runs as written, on CPU, in order, in a
scratch copy of the repository (its own checkpoints/, data/, hf/ ...), or is excluded below
with the reason.

What runs: each shell command (continuation lines joined; `[--flag X]` optional groups
dropped, as the docs' synopses mean); each ```python block (in this process, from the
scratch directory); each ```yaml block that starts with `# name.yml` (written as that file
before the page's commands run). Training commands run 2 steps (TINY is appended); SHORTER
makes a few long runs short. Other ```yaml blocks are config fragments: their keys must be
config keys. Blocks that are not commands (log output, a hostfile, JSON) are skipped. The
blocks run in the order of DOCS, so later ones use earlier results (the README's main job's
checkpoint is what docs/hf.md converts). No command may print a line of NOISE.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from megatron.config.loader import flatten
from tests.conftest import ROOT, free_port
from tests.run_folder_guard.plugin import FOLDERS

# README first: its main job makes the checkpoint and the corpus the other docs use.
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
PROGRAMS = ("python ", "pip ", "mpirun ", "srun ", "sbatch ", "deepspeed ", "OMP_NUM_THREADS=")

# (doc, text the command or block starts with) -> why it does not run here
EXCLUDED = {
    ("README.md", "pip install"): "installs from the network; CI's install step runs it",
    ("README.md", "python -m pytest"): "the test suite itself",
    ("docs/benchmarks.md", "python benchmarks/sepllm_attention.py --device cuda"): "GPU",
    ("docs/benchmarks.md", "python tools/streaming/evaluate_ppl.py --model_name_or_path /tmp"): (
        "a record of the benchmark's runs ([cache flags] stands for each row's flags); "
        "docs/streaming.md's command runs"
    ),
    ("docs/fused_kernels.md", "python megatron/fused_kernels/setup.py"): "needs CUDA / nvcc",
    ("docs/hf.md", "python tools/ckpts/convert_hf_to_neox.py --input_dir hf_in"): (
        "the round trip tests/hf/test_convert_roundtrip.py runs on its tiny Llama / GPT-NeoX"
    ),
    ("docs/hf.md", "python tools/ckpts/convert_neox_to_hf.py --input_dir ours"): (
        "the round trip tests/hf/test_convert_roundtrip.py runs on its tiny Llama / GPT-NeoX"
    ),
    ("docs/fused_kernels.md", "pip install --no-build-isolation"): "needs CUDA / nvcc",
    ("docs/launch.md", "python deepy.py train.py cfg.yml --num-nodes 4"): "multi-node",
    ("docs/launch.md", "#!/bin/bash"): (
        "a Slurm batch script: test_slurm_script_prepares_its_config runs all but srun"
    ),
    ("docs/launch.md", "mpirun"): "MPI (tests/launch/test_multinode.py runs mpirun -n 2)",
    ("docs/results.md", "OMP_NUM_THREADS=1 nice -n 5 python tools/experiments/run_study.py"): (
        "the whole study: hours on a 2-core CPU"
    ),
    ("docs/results.md", "python tools/experiments/run_study.py --out /tmp/smoke --smoke"): (
        "tests/experiments/test_study_smoke.py runs it"
    ),
    ("docs/results.md", "python eval.py --model_name_or_path runs/study/hf"): (
        "needs the study's conversions"
    ),
    ("docs/results.md", "python tools/plots/study_plots.py"): "needs the study's results",
    ("docs/results.md", "OMP_NUM_THREADS=1 python tools/experiments/run_recall.py --out runs/"): (
        "the recall benchmark's trainings: 20-40 min on a 2-core CPU"
    ),
    ("docs/results.md", "python benchmarks/recall.py --out runs/recall_b --report_only"): (
        "needs the recall benchmark's results"
    ),
    ("docs/results.md", "python tools/experiments/run_recall.py --out /tmp/recall_smoke"): (
        "tests/experiments/test_recall_smoke.py runs it (one variant)"
    ),
}
# Appended to every training command: 2 optimizer steps, one evaluation, one checkpoint.
TINY = (
    "--set train_iters=2 --set eval_interval=2 --set eval_iters=1 --set checkpoint_factor=2 "
    "--set train_micro_batch_size_per_gpu=4 --set log_interval=1"
)
# The same command, shorter: (doc, text in the command) -> (old, new)
SHORTER = {
    ("docs/streaming.md", "--num_eval_tokens 20000"): (
        "--num_eval_tokens 20000", "--num_eval_tokens 300"
    ),
    ("docs/hf.md", "max_new_tokens=256"): ("max_new_tokens=256", "max_new_tokens=16"),
    ("docs/streaming.md", "max_new_tokens=256"): ("max_new_tokens=256", "max_new_tokens=16"),
    ("docs/results.md", "python eval.py --model_name_or_path runs/study/ckpt"): (
        "shakespeare_lambada", "shakespeare_lambada --limit 4"
    ),
}  # fmt: skip


@dataclass
class Block:
    doc: str
    line: int
    lang: str  # "" for an indented block
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    """The fenced and the indented (4 spaces after a blank line) code blocks of a page."""
    lines, out, i = (ROOT / doc).read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            out.append(Block(doc, i + 1, fence.group(1), "\n".join(lines[i + 1 : end])))
            i = end + 1
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            text = "\n".join(x[4:] for x in lines[i:end]).strip("\n")
            if not re.match(r"\s*[-*|]|\d+\.", lines[i - 1] if i else ""):  # not a list item
                out.append(Block(doc, i + 1, "", text))
            i = end
        else:
            i += 1
    return out


def commands(text: str) -> list[str]:
    """Shell commands of a block: continuations joined, comments and `# ...` lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [c.split(" # ")[0].strip() for c in joined.splitlines() if c.strip()[:1] not in "#"]


def _yaml_file(text: str) -> str | None:
    name = re.match(r"#\s*(\S+\.ya?ml)\s*$", text.splitlines()[0])
    return name.group(1) if name else None


def excluded(doc: str, command: str) -> str | None:
    hits = [why for (d, start), why in EXCLUDED.items() if d == doc and command.startswith(start)]
    return hits[0] if hits else None


def shortened(doc: str, text: str) -> str:
    for (d, needle), (old, new) in SHORTER.items():
        if d == doc and needle in text:
            text = text.replace(old, new)
    return text


def prepared(doc: str, command: str) -> str:
    command = shortened(doc, re.sub(r"\s*\[--[^\]]*\]", "", command))  # synopsis: optional
    return f"{command} {TINY}" if is_training(command) else command


def is_training(command: str) -> bool:
    return bool(re.search(r"\btrain\.py\b", command)) and "--config-env" not in command


def units(doc: str) -> list[tuple[str, str, str]]:
    """(id, kind, payload) of what a page asks a user to run: kind is `run` (a shell command),
    `python`, `file` (a YAML written as its `# name.yml`), `keys` (a config fragment) or
    `excluded` (payload: the reason)."""
    out = []
    # the YAML files a page shows are written before its commands run (they use them)
    for b in sorted(blocks(doc), key=lambda b: not (b.lang == "yaml" and _yaml_file(b.text))):
        if b.lang == "python":
            out.append((b.id, "python", b.text))
        elif b.lang == "yaml":
            out.append((b.id, "file" if _yaml_file(b.text) else "keys", b.text))
        elif b.lang in ("", "bash", "sh", "shell", "console"):
            if b.text.startswith("#!") and (why := excluded(doc, "#!/bin/bash")):
                out.append((b.id, "excluded", why))
                continue
            for c in commands(b.text):
                if c.startswith(PROGRAMS):
                    why = excluded(doc, c)
                    out.append((b.id, "excluded", why) if why else (b.id, "run", c))
    return out


# Lines a user would have to learn to ignore (issue 20): none may come back.
NOISE = (
    "If you have GPU or other accelerator",
    "gets no documents",
    "Using topology:",
    ", nll ",
    "Combined length of context",
    "Detected call of `lr_scheduler.step()`",  # fine-tuning a converted checkpoint
)


def _param(i: int, where: str, kind: str, text: str) -> object:
    skip = [pytest.mark.skip(reason=text)] if kind == "excluded" else []
    return pytest.param(where, kind, text, id=f"{where}#{i}", marks=skip)


UNITS = [_param(i, *u) for doc in DOCS for i, u in enumerate(units(doc))]


@dataclass
class Workspace:
    path: Path
    ran: set[str]  # commands that ran here (a page may repeat another's)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """The repository's files (linked) without its run folders, plus the corpus.jsonl and
    corpus.jsonl.zst that docs/data.md's "your own data" starts from (a few hundred lines)."""
    import json

    from megatron.data.bundled import shakespeare_files

    ws = tmp_path_factory.mktemp("docs_workspace")
    for entry in ROOT.iterdir():
        if entry.name not in FOLDERS and not entry.name.startswith("."):
            (ws / entry.name).symlink_to(entry)
    lines = [ln for ln in Path(shakespeare_files()[0]).read_text().splitlines() if ln.strip()]
    corpus = "".join(json.dumps({"text": ln}) + "\n" for ln in lines[:400])
    (ws / "corpus.jsonl").write_text(corpus)
    subprocess.run(["zstd", "-q", "corpus.jsonl"], cwd=ws, check=True)  # as a user would
    return Workspace(ws, set())


def _run(argv: list[str], ws: Path, what: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what}\nexit {proc.returncode}\n{log[-6000:]}"
    noise = [ln for ln in log.splitlines() if any(n in ln for n in NOISE)]
    assert not noise, f"{what}: lines a user must learn to ignore:\n" + "\n".join(noise[:5])
    return log


@pytest.mark.slow
@pytest.mark.parametrize(("where", "kind", "payload"), UNITS)
def test_doc_block_runs(workspace: Workspace, where: str, kind: str, payload: str) -> None:
    doc, ws = where.split(":")[0], workspace.path
    if kind == "run":
        command = prepared(doc, payload)
        if command in workspace.ran:  # the same command on an earlier page: ran as written
            return
        if is_training(command):
            command += f" --set master_port={free_port()}"
        _run(["bash", "-c", command], ws, f"{where}: {command}")
        workspace.ran.add(prepared(doc, payload))
        for save in re.findall(r"--set save=(\S+)", command):
            assert not (ws / save / "launch").exists()  # no launch litter
    elif kind == "python":  # in this process: no interpreter and library start-up per block
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ws)
            exec(compile(shortened(doc, payload), where, "exec"), {"__name__": "__doc__"})
    elif kind == "file":
        (ws / _yaml_file(payload)).write_text(payload + "\n")
    else:  # a config fragment: every key must be a config key
        flatten(yaml.safe_load(payload), where)


def test_main_job_leaves_no_launch_files(workspace: Workspace) -> None:
    """Runs after the README's blocks when the whole file runs; alone, it checks nothing."""
    tiny = workspace.path / "checkpoints" / "tiny"
    if tiny.exists():
        assert (tiny / "latest").is_file() and not (tiny / "launch").exists()


def test_exclusions_name_existing_commands() -> None:
    """Each exclusion still matches a command of its page (else the list is stale)."""
    found = {(doc, start) for doc in DOCS for b in blocks(doc) for start in _starts(doc, b)}
    assert set(EXCLUDED) <= found, set(EXCLUDED) - found


def _starts(doc: str, b: Block) -> list[str]:
    firsts = ["#!/bin/bash"] if b.text.startswith("#!") else commands(b.text)
    return [start for (d, start) in EXCLUDED if d == doc for c in firsts if c.startswith(start)]


def test_slurm_script_prepares_its_config(workspace: Workspace) -> None:
    """docs/launch.md's sbatch script up to srun: validates and serializes its config."""
    script = next(b.text for b in blocks("docs/launch.md") if b.text.startswith("#!/bin/bash"))
    lines = [ln for ln in re.sub(r"\\\n\s*", " ", script).splitlines() if not ln.startswith("srun")]
    check = 'test -n "$PYTHON_SEPNEOX_CONFIG"'  # export X=$(...) hides the command's failure
    env = {"SLURM_SUBMIT_DIR": str(workspace.path), "SLURM_JOB_ID": "4242"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        _run(["bash", "-c", "\n".join([*lines, check])], workspace.path, "the sbatch script")


def test_config_files_named_in_docs_exist() -> None:
    named = {
        (doc, path)
        for doc in DOCS
        for b in blocks(doc)
        for path in re.findall(r"\bconfigs/[\w/.-]+\.ya?ml\b", b.text)
    }
    assert named and all((ROOT / p).is_file() for _, p in named), [
        n for n in named if not (ROOT / n[1]).is_file()
    ]
