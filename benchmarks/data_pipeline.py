#!/usr/bin/env python
"""Data-pipeline benchmark: preprocessing throughput, index building, peak memory.

1. Preprocessing tokens/s with 1 and 2 workers: the bundled Shakespeare corpus, cut into
   ~4 KB documents (paragraph groups, a typical web-document size) and repeated to at least
   --min-tokens tokens as jsonl; byte-level BPE of 8,192 ids; --append-eod. Each run is a
   fresh subprocess of tools/datasets/preprocess_data.py; wall time includes start-up.
2. Peak RSS (largest single process, main or worker) at two input sizes: flat memory means the
   peak does not grow with the input.
3. Sample-index building for --index-tokens tokens, C++ helper vs numpy fallback.

Baselines in the same run, on the same documents, tokenizer file and cores:
- the raw HF `tokenizers` rate: `Tokenizer.encode_batch` (and `encode_batch_fast`) on the
  documents already in memory, 1 and 2 threads: no JSON, no I/O, no index, so the limit a
  preprocessor can approach;
- with `--neox-checkout PATH`, GPT-NeoX's own `tools/datasets/preprocess_data.py` from that
  checkout, 1 and 2 workers, on the same jsonl (its outputs are compared byte for byte).

Usage: python benchmarks/data_pipeline.py [--min-tokens 50e6] [--neox-checkout ../gpt-neox]
       [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron.data import helpers  # noqa: E402
from megatron.data.bundled import ensure_shakespeare, shakespeare_files  # noqa: E402
from megatron.data.gpt_dataset import build_index_arrays  # noqa: E402
from megatron.data.indexed_dataset import MMapIndexedDataset  # noqa: E402

NEOX_SCRIPT = os.path.join("tools", "datasets", "preprocess_data.py")

# The child runs a preprocessing script in-process and reports its peak RSS.
_PEAK_WRAPPER = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as e:\n    code = e.code\n"
    "    if code not in (None, 0):\n        raise\n"
    # VmHWM, not RUSAGE_SELF: ru_maxrss survives exec, so it would report the driver's RSS.
    "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')]\n"
    "print('PEAK_KIB', hwm[0], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def make_docs(target_chars: int = 4000) -> list[str]:
    docs = []
    for path in shakespeare_files():
        with open(path, encoding="utf-8") as f:
            paras = f.read().split("\n\n")
        cur: list[str] = []
        size = 0
        for p in paras:
            cur.append(p)
            size += len(p) + 2
            if size >= target_chars:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
        if cur:
            docs.append("\n\n".join(cur))
    return docs


def write_jsonl(path: str, docs: list[str], repeats: int) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for r in range(repeats):
            for d in docs:
                f.write(json.dumps({"text": d, "meta": {"rep": r}}) + "\n")
    return os.path.getsize(path)


def _run_with_peak(
    cmd_tail: list[str], cwd: str, env: dict | None = None
) -> tuple[float, int, int]:
    """Run a script under the peak-RSS wrapper; (wall s, main peak KiB, largest child KiB)."""
    cmd = [sys.executable, "-c", _PEAK_WRAPPER, *cmd_tail]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    wall = time.perf_counter() - t0
    peak = [ln.split()[1:] for ln in res.stdout.splitlines() if ln.startswith("PEAK_KIB")]
    if res.returncode != 0 or not peak:
        raise RuntimeError(f"{cmd_tail[0]} failed:\n{res.stderr[-2000:]}")
    return wall, int(peak[0][0]), int(peak[0][1])


def _same_flags(inp: str, out: str, tok: str, workers: int) -> list[str]:
    """The preprocessing flags ours and GPT-NeoX's preprocess_data.py both take."""
    return [
        "--input", inp, "--output-prefix", out, "--tokenizer-type", "HFTokenizer",
        "--vocab-file", tok, "--append-eod", "--workers", str(workers),
    ]  # fmt: skip


def run_preprocess(inp: str, out: str, tok: str, workers: int) -> dict:
    """One CLI run in a child process; peak RSS = largest RSS of any descendant process."""
    script = os.path.join(REPO, "tools/datasets/preprocess_data.py")
    wall, main_kib, worker_kib = _run_with_peak(
        [script, *_same_flags(inp, out, tok, workers), "--no-progress"],
        cwd=REPO,
    )
    prefix = out + "_text_document"
    ds = MMapIndexedDataset(prefix)
    return {
        "impl": "ours",
        "workers": workers,
        "docs": len(ds),
        "tokens": ds.num_tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(ds.num_tokens / wall),
        "peak_rss_main_mib": round(main_kib / 1024, 1),
        "peak_rss_worker_mib": round(worker_kib / 1024, 1),
    }


def neox_script(checkout: str) -> str:
    """GPT-NeoX's preprocess_data.py in `checkout`, or a clear error."""
    path = os.path.join(os.path.abspath(checkout), NEOX_SCRIPT)
    if not os.path.isfile(path):
        raise SystemExit(
            f"--neox-checkout {checkout!r}: no {NEOX_SCRIPT} there; give the root of a "
            "GPT-NeoX clone (git clone https://github.com/EleutherAI/gpt-neox)"
        )
    return path


def run_neox(checkout: str, inp: str, out: str, tok: str, workers: int) -> dict:
    """GPT-NeoX's preprocess_data.py with the same flags, from its checkout (its `megatron`
    package, not ours: the child runs with the checkout as working directory and path)."""
    script = neox_script(checkout)
    root = os.path.dirname(os.path.dirname(os.path.dirname(script)))
    env = {**os.environ, "PYTHONPATH": root}
    wall, main_kib, worker_kib = _run_with_peak(
        [script, *_same_flags(inp, out, tok, workers), "--log-interval", "1000000000"],
        cwd=root,
        env=env,
    )
    ds = MMapIndexedDataset(out + "_text_document")
    return {
        "impl": "gpt-neox",
        "workers": workers,
        "docs": len(ds),
        "tokens": ds.num_tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(ds.num_tokens / wall),
        "peak_rss_main_mib": round(main_kib / 1024, 1),
        "peak_rss_worker_mib": round(worker_kib / 1024, 1),
    }


def same_files(prefix_a: str, prefix_b: str) -> bool:
    """Byte-identical .bin and .idx."""
    for ext in (".bin", ".idx"):
        with open(prefix_a + ext, "rb") as fa, open(prefix_b + ext, "rb") as fb:
            while True:
                a, b = fa.read(1 << 24), fb.read(1 << 24)
                if a != b:
                    return False
                if not a:
                    break
    return True


_RAW_ENCODE = """
import json, os, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = json.load(open(sys.argv[2]))
min_tokens, batch = float(sys.argv[3]), int(sys.argv[4])
out = {}
for name in ("encode_batch", "encode_batch_fast"):
    encode = getattr(tok, name, None)
    if encode is None:
        continue
    encode(docs[:batch], add_special_tokens=False)  # warm-up (thread pool start)
    n, t0 = 0, time.perf_counter()
    while n < min_tokens:
        for i in range(0, len(docs), batch):
            n += sum(len(e.ids) for e in encode(docs[i:i + batch], add_special_tokens=False))
    out[name] = n / (time.perf_counter() - t0)
print("RAW", json.dumps(out))
"""


def raw_tokenizer_rate(tok: str, docs_json: str, threads: int, min_tokens: float) -> dict:
    """tokens/s of HF tokenizers' batch encoding alone, `threads` Rayon threads, batches of
    256 documents (the preprocessor's batch), in a fresh process."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    cmd = [sys.executable, "-c", _RAW_ENCODE, tok, docs_json, str(min_tokens), "256"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RAW ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(res.stderr[-2000:])
    rates = json.loads(line[0][4:])
    return {"impl": "tokenizers", "threads": threads, **{k: round(v) for k, v in rates.items()}}


def _mib(r: dict) -> str:
    return f"{r['peak_rss_main_mib']:.0f} / {r['peak_rss_worker_mib']:.0f} MiB"


def table(report: dict) -> str:
    """The preprocessing results as one markdown table."""
    neox = {r["workers"]: r["tokens_per_s"] for r in report.get("neox", [])}
    raw = {r["threads"]: r for r in report.get("raw_tokenizers", [])}
    lines = [
        "| run | workers / threads | input tokens | tokens/s | ours / NeoX | "
        "of raw encode_batch_fast | peak RSS main / largest child | load (1 min) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["preprocess"]:
        w = r["workers"]
        ratio = f"{r['tokens_per_s'] / neox[w]:.2f}x" if w in neox and "input" not in r else ""
        limit = raw.get(w, {}).get("encode_batch_fast") or raw.get(w, {}).get("encode_batch")
        frac = f"{r['tokens_per_s'] / limit:.0%}" if limit else ""
        name = "ours" + (f" ({r['input']})" if "input" in r else "")
        lines.append(
            f"| {name} | {w} | {r['tokens'] / 1e6:.1f} M | {r['tokens_per_s'] / 1e6:.2f} M "
            f"| {ratio} | {frac} | {_mib(r)} | {r.get('loadavg_1m', 0):.1f} |"
        )
    for r in report.get("neox", []):
        lines.append(
            f"| GPT-NeoX preprocess_data.py | {r['workers']} | {r['tokens'] / 1e6:.1f} M "
            f"| {r['tokens_per_s'] / 1e6:.2f} M | | | {_mib(r)} | {r.get('loadavg_1m', 0):.1f} |"
        )
    for t, r in sorted(raw.items()):
        for name in ("encode_batch", "encode_batch_fast"):
            if name in r:
                lines.append(
                    f"| tokenizers `{name}` (in memory) | {t} | | {r[name] / 1e6:.2f} M "
                    f"| | | | {r.get('loadavg_1m', 0):.1f} |"
                )
    return "\n".join(lines)


def bench_index(total_tokens: int, mean_doc: int, seq_length: int = 2048) -> dict:
    rng = np.random.default_rng(0)
    n_docs = total_tokens // mean_doc
    sizes = rng.integers(1, 2 * mean_doc, n_docs).astype(np.int32)
    docs = np.arange(n_docs)
    doc_idx = np.random.RandomState(0).permutation(n_docs).astype(np.int64)
    ns = (int(sizes.sum()) - 1) // seq_length
    out = {"tokens": int(sizes.sum()), "documents": n_docs, "seq_length": seq_length}
    ext = helpers.get_extension()
    impls = {"numpy": helpers.build_sample_idx_numpy}
    if ext is not None:
        impls["cpp"] = ext.build_sample_idx
    results = {}
    for name, fn in impls.items():
        t0 = time.perf_counter()
        results[name] = fn(sizes, doc_idx, seq_length, ns)
        out[f"sample_idx_{name}_s"] = round(time.perf_counter() - t0, 4)
    if ext is not None:
        out["identical"] = bool(np.array_equal(results["numpy"], results["cpp"]))
    t0 = time.perf_counter()
    build_index_arrays(sizes, docs, seq_length, ns, seed=1)  # doc + sample + shuffle idx
    out["all_three_arrays_s"] = round(time.perf_counter() - t0, 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--min-tokens", type=float, default=50e6)
    ap.add_argument("--index-tokens", type=float, default=1e8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--neox-checkout",
        default=None,
        metavar="PATH",
        help="a GPT-NeoX clone: also run its tools/datasets/preprocess_data.py on the same input",
    )
    ap.add_argument(
        "--raw-tokens",
        type=float,
        default=10e6,
        help="tokens per raw tokenizers encode_batch measurement",
    )
    a = ap.parse_args()
    if a.neox_checkout:
        neox_script(a.neox_checkout)  # fail before the long part
    work = a.workdir or tempfile.mkdtemp(prefix="data_bench_")
    _, tok = ensure_shakespeare(os.path.join(work, "shakespeare"), 8192)
    docs = make_docs()
    # The bundled corpus is ~1.5M tokens; repeat it until the jsonl holds >= min_tokens.
    repeats = int(np.ceil(a.min_tokens / 1.5e6))
    big, small = os.path.join(work, "big.jsonl"), os.path.join(work, "small.jsonl")
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "docs_per_repeat": len(docs),
        "repeats": repeats,
        "jsonl_mib": round(write_jsonl(big, docs, repeats) / 2**20, 1),
        "preprocess": [],
    }
    write_jsonl(small, docs, max(1, repeats // 8))
    docs_json = os.path.join(work, "docs.json")
    with open(docs_json, "w") as f:
        json.dump(docs, f)
    report["raw_tokenizers"] = []
    report["neox"] = []
    # Each n: the raw tokenizer rate, ours and NeoX back to back, so that on a shared machine
    # the rows compared with each other ran under about the same load (loadavg per row).
    for w in (1, 2):
        r = raw_tokenizer_rate(tok, docs_json, w, a.raw_tokens)
        r["loadavg_1m"] = os.getloadavg()[0]
        print(json.dumps(r), flush=True)
        report["raw_tokenizers"].append(r)
        r = run_preprocess(big, os.path.join(work, f"big_w{w}"), tok, w)
        r["loadavg_1m"] = os.getloadavg()[0]
        print(json.dumps(r), flush=True)
        report["preprocess"].append(r)
        if a.neox_checkout:
            r = run_neox(a.neox_checkout, big, os.path.join(work, f"neox_w{w}"), tok, w)
            r["identical_to_ours"] = same_files(
                os.path.join(work, f"neox_w{w}_text_document"),
                os.path.join(work, f"big_w{w}_text_document"),
            )
            r["loadavg_1m"] = os.getloadavg()[0]
            print(json.dumps(r), flush=True)
            report["neox"].append(r)
    r = run_preprocess(small, os.path.join(work, "small_w2"), tok, 2)
    r["input"] = "1/8 input"
    r["loadavg_1m"] = os.getloadavg()[0]
    print(json.dumps(r), flush=True)
    report["preprocess"].append(r)
    for mean_doc in (1000, 100):
        r = bench_index(int(a.index_tokens), mean_doc)
        print(json.dumps(r), flush=True)
        report.setdefault("index", []).append(r)
    report["loadavg_at_end"] = os.getloadavg()
    report["tokenizers_version"] = tokenizers.__version__
    print(
        f"\n{report['machine']}, Python {report['python']}, tokenizers "
        f"{tokenizers.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"load {report['loadavg_at_start'][0]:.2f} -> {report['loadavg_at_end'][0]:.2f}"
    )
    print(table(report))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
