"""Export an index's codes to faiss (optional dependency: ``pip install faiss-cpu``, the ``bench``
extra), for galleries past what exact search serves within a latency budget.

Exact search (:meth:`SearchIndex.search_codes`) costs one pass over the gallery per query batch:
~2·nq·n·d flops and n·d·4 bytes read. Approximate indexes touch a fraction of it:

- ``"ivf"`` (IndexIVFFlat, inner product): k-means into `nlist` lists (default ~4·sqrt(n)),
  a query scans `nprobe` of them — about nprobe/nlist of the exact cost; memory = the codes.
- ``"hnsw"`` (IndexHNSWFlat, inner product): a graph; ~log(n) hops per query, no training, memory
  = the codes + ~2·M int32 links per item; the fastest single queries, slow to build.

The codes are L2-normalised, so inner product is cosine. faiss returns gallery rows; map them to ids
with :meth:`SearchIndex.ids_of`.
"""

from __future__ import annotations

import errno
import math
import os
import re
from pathlib import Path

import numpy as np

from ..store.files import WriteFailed, write_new_file
from .index import SearchIndex

KINDS = ("ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("faiss export needs faiss: pip install faiss-cpu (or sdml_ext[bench])") from None
    return faiss


def check_options(kind: str, nlist, nprobe) -> None:
    """ValueError naming the option: an unknown kind, nlist/nprobe that are not integers >= 1,
    nprobe more than nlist, or either given with hnsw (which has neither)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "hnsw" and (nlist is not None or nprobe is not None):
        raise ValueError(f"--{'nlist' if nlist is not None else 'nprobe'} applies to kind ivf, not hnsw")
    for name, value in (("nlist", nlist), ("nprobe", nprobe)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"--{name} must be an integer >= 1, got {value}")
    if nlist is not None and nprobe is not None and nprobe > nlist:
        raise ValueError(f"--nprobe {nprobe} is more than --nlist {nlist}: a query scans at most every list")


def to_faiss(index: SearchIndex, kind: str = "ivf", *, nlist: int | None = None, nprobe: int | None = None,
             m: int = 32, ef_search: int = 128, train_rows: int = 100_000, seed: int = 0):
    """A faiss index (inner product) over the codes of `index`, filled block by block.

    Args:
        kind: "ivf" (IndexIVFFlat) or "hnsw" (IndexHNSWFlat).
        nlist: IVF lists (default ~4·sqrt(n), at most n / 39 so every list gets training points);
            nprobe: lists a query scans (default nlist / 16, at least 1).
        m: HNSW links per node; ef_search: HNSW search breadth.
        train_rows: rows sampled (evenly, reproducibly) to train the IVF quantizer.
    """
    check_options(kind, nlist, nprobe)
    faiss = _faiss()
    d, n = index.d, index.n
    if kind == "hnsw":
        out = faiss.IndexHNSWFlat(d, int(m), faiss.METRIC_INNER_PRODUCT)
        out.hnsw.efSearch = int(ef_search)
    else:
        nlist = int(nlist) if nlist is not None else max(1, min(int(4 * math.sqrt(n)), n // 39))
        if not 1 <= nlist <= n:
            raise ValueError(f"--nlist must be in [1, {n}] (the index's items), got {nlist}")
        if nprobe is not None and nprobe > nlist:  # before the quantizer's training, not after
            raise ValueError(f"--nprobe must be in [1, nlist={nlist}], got {nprobe}")
        out = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, int(train_rows)), replace=False))
        out.train(_rows(index, sample))
        out.nprobe = int(nprobe) if nprobe is not None else max(1, nlist // 16)
    for _, block in index.blocks():
        out.add(np.ascontiguousarray(block.cpu().numpy(), dtype=np.float32))
    return out


def _rows(index: SearchIndex, rows: np.ndarray) -> np.ndarray:
    """Codes of the given sorted gallery rows, gathered block by block."""
    parts, at = [], 0
    for start, block in index.blocks():
        stop = start + block.shape[0]
        end = int(np.searchsorted(rows, stop))
        if end > at:
            parts.append(block.cpu().numpy()[rows[at:end] - start])
        at = end
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _reason(exc: RuntimeError) -> str:
    """The system's reason in a faiss write error ("... write error in FILE: 5 != 60 (No space
    left on device)"), else faiss's last line: faiss's C++ location says nothing to a user."""
    text = str(exc).strip()
    reasons = {os.strerror(code) for code in errno.errorcode}
    found = [r for r in re.findall(r"\(([^()]+)\)", text) if r in reasons]
    return found[-1] if found else text.splitlines()[-1]


def export_faiss(index: SearchIndex, path, kind: str = "ivf", **options) -> Path:
    """Write ``to_faiss(index, kind, **options)`` to a new file `path` (atomically; refuses to
    replace an existing file). Read it back with ``faiss.read_index``."""
    check_options(kind, options.get("nlist"), options.get("nprobe"))
    faiss = _faiss()
    if Path(path).exists():
        raise FileExistsError(f"output {path} already exists; choose another path or remove it first")
    built = to_faiss(index, kind, **options)

    def write(tmp: str) -> None:
        try:
            faiss.write_index(built, tmp)
        except RuntimeError as exc:  # faiss reports a failed write (a full disk) this way
            raise WriteFailed(None, f"cannot write {path}: {_reason(exc)}") from None

    return write_new_file(path, write)
