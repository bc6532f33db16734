"""Search a gallery several times larger than the memory the process may use.

Run (as root, or as a user who may create memory cgroups; a few minutes):
    .venv/bin/python -P benchmarks/bench_search_memory.py [--limit-mib 1024] [--factor 4.25] [--dir /tmp]

What bounds memory here: a memory cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``)
created as a child of this process's own cgroup, holding the build and search processes. It
charges everything those processes make resident — anonymous memory and the page cache of the
files they write and read — and the kernel reclaims page cache (or OOM-kills the process) at the
limit, so a process that needed the gallery in memory could not finish. The rlimits do not work as
a bound here: RLIMIT_RSS is not enforced by Linux, RLIMIT_DATA does not count file mappings, and
RLIMIT_AS counts address space: torch's libraries alone reserve ~3.4 GB of it (RSS ~0.55 GB).

Steps: train a tiny bundle (codes of width 512, small hidden layers so encoding is cheap), write
raw gallery features to a .npy file, then in the cgroup (1) build the index streaming from the
memory-mapped features (one encode block and one shard buffer in memory), (2) load it (sha256 of
every shard) and search 64 queries for their top 10, streaming the shards in blocks, and check the
returned scores against the stored codes. Prints the gallery size, the limit, each process's peak
RSS (VmHWM: anonymous + file-mapped pages) and the cgroup's peak charge, and the times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CODE_DIM, FEATURE_DIM = 512, 32


def own_cgroup() -> tuple[str, Path] | None:
    """(version, directory) of this process's memory cgroup, if one can hold a child of ours."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists():
        rel = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        if "memory" in (base / "cgroup.subtree_control").read_text().split():
            return "v2", base
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            return "v1", Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
    return None


class MemoryCgroup:
    """A child memory cgroup with a limit; removed on exit (after its processes have ended)."""

    def __init__(self, limit: int):
        found = own_cgroup()
        if found is None:
            raise SystemExit("no memory cgroup that this process may create a child in (needs root, or a "
                             "delegated cgroup v2 subtree with the memory controller enabled)")
        self.version, parent = found
        self.path = parent / f"sdml-search-bench-{os.getpid()}"
        try:
            self.path.mkdir()
        except OSError as exc:
            raise SystemExit(f"cannot create a memory cgroup under {parent}: {exc}") from None
        if self.version == "v1":
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
        else:
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        return int((self.path / name).read_text())

    def reset_peak(self) -> None:
        if self.version == "v1":
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def enter(self) -> None:
        """Move the calling process into the cgroup (run in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.path.rmdir()
        except OSError as exc:
            print(f"warning: could not remove {self.path}: {exc}", file=sys.stderr)


def child(argv: list[str]) -> None:
    """Runs inside the cgroup: build or search, then print a JSON line with the measurements."""
    import torch

    import sdml_ext
    from sdml_ext.search import build_index, load_index

    step, work = argv[0], Path(argv[1])
    bundle = sdml_ext.load(work / "bundle")
    status = Path("/proc/self/status").read_text().splitlines()
    import_rss = int(next(line.split()[1] for line in status if line.startswith("VmRSS:"))) * 1024
    t0 = time.perf_counter()
    if step == "build":
        features = np.load(work / "features.npy", mmap_mode="r")
        index = build_index(bundle, "m0", features, path=work / "index")  # default shard and block sizes
        result = {"rows": index.n}
    else:
        index = load_index(work / "index", bundle)  # sha256 of every shard: one streaming pass
        t_load = time.perf_counter() - t0
        queries = np.random.default_rng(1).standard_normal((64, FEATURE_DIM)).astype(np.float32)
        codes = index.encode(queries, "m1")
        t1 = time.perf_counter()
        top = index.search_codes(codes, 10)
        t_search = time.perf_counter() - t1
        # The returned scores are the cosines with the stored codes of the returned rows.
        worst = 0.0
        for qi in range(0, 64, 8):
            rows = top.indices[qi]
            stored = torch.stack([index._read_rows(int(r), int(r) + 1)[0] for r in rows])
            cos = torch.nn.functional.normalize(codes[qi : qi + 1], dim=1) @ stored.T
            worst = max(worst, float((cos[0] - top.scores[qi]).abs().max()))
        result = {"load_verify_s": t_load, "search_s": t_search, "max_score_error": worst,
                  "block_rows": index.block_rows}
    result["wall_s"] = time.perf_counter() - t0
    result["rss_after_imports"] = import_rss  # torch, sdml_ext and the bundle, before any gallery work
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def prepare(work: Path, rows: int) -> None:
    """A tiny trained bundle and `rows` raw features on disk (written in chunks)."""
    from sdml_ext.store.bundle import save_bundle
    from sdml_ext.data import make_synthetic
    from sdml_ext.model import make_projection
    from sdml_ext.engine.strategies import train_tasks
    from sdml_ext.engine.training import TrainOptions, make_tasks

    opts = TrainOptions(hidden=(64, 64), code_dim=CODE_DIM, batch_size=100, epochs=1, seed=0)
    ds = make_synthetic(2, n_train=400, n_val=100, n_test=100, n_classes=10, dims=FEATURE_DIM, seed=0)
    P = make_projection(CODE_DIM, 10, 0)
    report = train_tasks(make_tasks(list(ds), P, opts), "serial")
    save_bundle(work / "bundle", P=P, projection_seed=0, results=report.modalities, class_names=ds.class_names,
                dataset={"name": ds.name}, config={}, run=report.summary())
    out = np.lib.format.open_memmap(work / "features.npy", mode="w+", dtype=np.float32, shape=(rows, FEATURE_DIM))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 1 << 18):
        stop = min(rows, start + (1 << 18))
        out[start:stop] = rng.standard_normal((stop - start, FEATURE_DIM), dtype=np.float32)
    out.flush()
    del out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit-mib", type=int, default=1024, help="memory limit of the cgroup (default 1024 MiB)")
    p.add_argument("--factor", type=float, default=4.25, help="gallery codes / limit (default 4.25)")
    p.add_argument("--dir", default=None, help="where the bundle, features and index go (default: a temp dir)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    limit = args.limit_mib << 20
    rows = int(args.factor * limit) // (4 * CODE_DIM)
    work = Path(tempfile.mkdtemp(prefix="sdml-search-bench-", dir=args.dir))
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    try:
        t0 = time.perf_counter()
        prepare(work, rows)
        print(f"prepared a bundle and {rows:,} x {FEATURE_DIM} features in {time.perf_counter() - t0:.1f} s")
        with MemoryCgroup(limit) as cgroup:
            for step in ("build", "search"):
                cgroup.reset_peak()
                proc = subprocess.run([sys.executable, "-P", __file__, "--child", step, str(work)], capture_output=True,
                                      text=True, preexec_fn=cgroup.enter)
                if proc.returncode != 0:
                    raise SystemExit(f"{step} failed (status {proc.returncode}; -9 = killed at the memory limit):\n"
                                     f"{proc.stderr[-3000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["cgroup_peak"] = cgroup.peak()
                gallery = sum(f.stat().st_size for f in (work / "index").glob("shard-*.safetensors"))
                print(f"{step}: " + ", ".join(
                    f"{k} {v / 2**20:,.0f} MiB" if k in ("rss_after_imports", "peak_rss", "cgroup_peak") else
                    f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v:,}" for k, v in result.items()))
        print(f"gallery: {rows:,} codes x {CODE_DIM} float32 = {gallery / 2**30:.2f} GiB in "
              f"{len(list((work / 'index').glob('shard-*')))} shards; cgroup limit {limit / 2**30:.2f} GiB "
              f"(gallery / limit = {gallery / limit:.2f}); load after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
