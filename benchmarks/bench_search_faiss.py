"""Exact search against the faiss export: latency per query batch and recall@10 (needs faiss-cpu).

Run: .venv/bin/python -P benchmarks/bench_search_faiss.py [--rows 100000] [--rounds 3]

A gallery of clustered unit-norm codes (d = 512, 1,000 centres) in an index written with
IndexWriter (the codes a bundle would produce, without the encoding time), searched for the top 10
by 1 query and by 1,000 queries: exact (`SearchIndex.search_codes`, streamed from the shard files
and in memory) and the faiss IVF (default nlist / nprobe) and HNSW (M = 32, efSearch = 128)
exports. The alternatives run interleaved, median of `--rounds`; the one-minute load is printed
before each round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sdml_ext
from sdml_ext.store.bundle import save_bundle
from sdml_ext.data import make_synthetic
from sdml_ext.model import make_projection
from sdml_ext.search import IndexWriter, load_index, to_faiss
from sdml_ext.search.index import source_of
from sdml_ext.engine.strategies import train_tasks
from sdml_ext.engine.training import TrainOptions, make_tasks

D = 512


def tiny_bundle(path: Path):
    opts = TrainOptions(hidden=(16, 16), code_dim=D, batch_size=50, epochs=1, seed=0)
    ds = make_synthetic(1, n_train=100, n_val=50, n_test=10, n_classes=4, dims=8, seed=0)
    P = make_projection(D, 4, 0)
    report = train_tasks(make_tasks(list(ds), P, opts), "serial")
    save_bundle(path, P=P, projection_seed=0, results=report.modalities, class_names=ds.class_names,
                dataset={"name": ds.name}, config={}, run=report.summary())
    return sdml_ext.load(path)


def clustered(n: int, gen: torch.Generator, centres: torch.Tensor) -> torch.Tensor:
    return centres[torch.randint(0, centres.shape[0], (n,), generator=gen)] + 0.5 * torch.randn(n, D, generator=gen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sdml-search-faiss-"))
    try:
        bundle = tiny_bundle(work / "bundle")
        gen = torch.Generator().manual_seed(0)
        centres = torch.randn(1000, D, generator=gen)
        with IndexWriter(work / "index", source_of(bundle, "m0"), D) as writer:
            for _ in range(0, args.rows, 50_000):
                writer.append(clustered(min(50_000, args.rows - writer.rows), gen, centres))
        streamed, in_memory = load_index(work / "index", bundle), load_index(work / "index", bundle, in_memory=True)
        t0 = time.perf_counter()
        ivf = to_faiss(in_memory, "ivf")
        t_ivf = time.perf_counter() - t0
        t0 = time.perf_counter()
        hnsw = to_faiss(in_memory, "hnsw")
        t_hnsw = time.perf_counter() - t0
        print(f"n = {args.rows:,}, d = {D}; faiss build: ivf (nlist {ivf.nlist}, nprobe {ivf.nprobe}) {t_ivf:.1f} s, "
              f"hnsw {t_hnsw:.1f} s; {torch.get_num_threads()} threads")
        for nq in (1, 1000):
            q = torch.nn.functional.normalize(clustered(nq, gen, centres), dim=1)
            qn = q.numpy()
            exact = in_memory.search_codes(q, 10).indices.numpy()
            runs = {
                "exact streamed": lambda: streamed.search_codes(q, 10),
                "exact in memory": lambda: in_memory.search_codes(q, 10),
                "faiss ivf": lambda: ivf.search(qn, 10),
                "faiss hnsw": lambda: hnsw.search(qn, 10),
            }
            times: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(args.rounds):
                print(f"  nq {nq} round {r + 1}: load {os.getloadavg()[0]:.2f}")
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
            for name, run in runs.items():
                found = run()
                found = found.indices.numpy() if hasattr(found, "indices") else found[1]
                recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
                print(f"nq {nq:5d}  {name:16s} {statistics.median(times[name]) * 1e3:9.1f} ms  recall@10 {recall:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
