#!/usr/bin/env python
"""Data-pipeline benchmark: preprocessing throughput, index building, peak memory.

1. Preprocessing tokens/s with 1 and 2 workers: the bundled Shakespeare corpus, cut into
   ~4 KB documents (paragraph groups, a typical web-document size) and repeated to at least
   --min-tokens tokens as jsonl; byte-level BPE of 8,192 ids; --append-eod. Each run is a
   fresh subprocess of tools/datasets/preprocess_data.py; wall time includes start-up.
2. Peak RSS (largest single process, main or worker) at two input sizes: flat memory means the
   peak does not grow with the input.
3. Sample-index building for --index-tokens tokens, C++ helper vs numpy fallback.

Usage: python benchmarks/data_pipeline.py [--min-tokens 50e6] [--out results.json]
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron.data import helpers  # noqa: E402
from megatron.data.bundled import ensure_shakespeare, shakespeare_files  # noqa: E402
from megatron.data.gpt_dataset import build_index_arrays  # noqa: E402


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


def run_preprocess(inp: str, out: str, tok: str, workers: int) -> dict:
    """One CLI run in a child process; peak RSS = largest RSS of any descendant process."""
    code = (
        "import resource, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        # VmHWM, not RUSAGE_SELF: ru_maxrss survives exec, so it would report the driver's RSS.
        "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')]\n"
        "print('PEAK_KIB', hwm[0], resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    cmd = [
        sys.executable, "-c", code, os.path.join(REPO, "tools/datasets/preprocess_data.py"),
        "--input", inp, "--output-prefix", out, "--tokenizer-type", "HFTokenizer",
        "--vocab-file", tok, "--append-eod", "--workers", str(workers), "--no-progress",
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    peak = [ln.split()[1:] for ln in res.stdout.splitlines() if ln.startswith("PEAK_KIB")][0]
    main_kib, worker_kib = int(peak[0]), int(peak[1])
    prefix = out + "_text_document"
    from megatron.data.indexed_dataset import MMapIndexedDataset

    ds = MMapIndexedDataset(prefix)
    return {
        "workers": workers,
        "docs": len(ds),
        "tokens": ds.num_tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(ds.num_tokens / wall),
        "peak_rss_main_mib": round(main_kib / 1024, 1),
        "peak_rss_worker_mib": round(worker_kib / 1024, 1),
        "summary": [ln for ln in res.stdout.splitlines() if "documents" in ln][-1],
    }


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
    a = ap.parse_args()
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
    for w in (1, 2):
        r = run_preprocess(big, os.path.join(work, f"big_w{w}"), tok, w)
        print(json.dumps(r), flush=True)
        report["preprocess"].append(r)
    r = run_preprocess(small, os.path.join(work, "small_w2"), tok, 2)
    r["input"] = "small (1/8 size)"
    print(json.dumps(r), flush=True)
    report["preprocess"].append(r)
    for mean_doc in (1000, 100):
        r = bench_index(int(a.index_tokens), mean_doc)
        print(json.dumps(r), flush=True)
        report.setdefault("index", []).append(r)
    report["loadavg_at_end"] = os.getloadavg()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
