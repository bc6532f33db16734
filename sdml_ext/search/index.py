"""A searchable gallery of common-space codes: build it from a bundle, save it, load it, query it.

    INDEX/
      index.json                 what the index holds (below); written last, the commit point
      shard-00000.safetensors    rows [0, r0): "codes" [r0, d] L2-normalised (float32, or float16),
      shard-00001.safetensors    optional "ids" [r] int64 (or "id_offsets" [r + 1] int64 and
      ...                        "id_utf8" [bytes] uint8 for string ids), optional "labels"

index.json: format and version, creation time, library versions, the source (bundle path, P's
sha256, gallery modality, that modality's network file sha256), rows n, width d, id kind and label
kind, and per shard its file, rows and sha256; each shard's own metadata names its first row, so
shards listed out of order are caught too.

The codes live in shards so that a gallery larger than memory can be built and searched: a build
encodes the features block by block and appends shards; a search streams the gallery in blocks of
`block_rows` rows (each read from its shard file through safetensors' memory map, copied to the
bundle's device and unmapped again), runs `cosine_topk` on the block and merges the block's top k
into the running top k. Blocks cover global rows whatever the shard layout, so a sharded and an
unsharded index give bit-identical results; equal scores are ordered by ascending gallery row, as
`cosine_topk` orders them within a block. Peak memory is one block (plus the queries and the
[nq, 2k] merge), not the gallery. Shards are safetensors rather than raw .npy memory maps so that
every index file has one format, as the bundle's, whose header the library checks (dtype, shape,
bounds) before a byte is mapped; opening a shard per block keeps nothing mapped between blocks,
so pages already searched do not accumulate in the process's resident memory.

Writes are atomic and never replace anything (an index is assembled in a temporary sibling
directory and renamed into place). Loading reads JSON and safetensors only (never pickle) and
verifies every file's sha256 (``verify=False`` skips that pass over the files of a huge trusted
index). An index knows the bundle it came from and refuses a bundle with another P or another
network for the gallery modality: codes from another model live in another space.
"""

from __future__ import annotations

import datetime as _dt
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import Tensor

from .._files import read_directory_manifest
from ..bundle import Bundle, _file_sha256, _fsync_write_json, _publish, check_new_bundle_path, load, versions
from ..ops.retrieval import TopK, cosine_topk

FORMAT = "sdml-search-index"
FORMAT_VERSION = 1
MANIFEST = "index.json"
#: Default block and shard sizes, in bytes of float32 codes. A search holds one block (plus a
#: copy on its way from the file); a build one encode block and one shard (plus the copy that
#: safetensors serialises), so both stay at a few hundred MiB whatever the gallery.
DEFAULT_BLOCK_BYTES = 32 << 20
DEFAULT_SHARD_BYTES = 64 << 20
ID_KINDS = ("position", "int", "str")
#: Storage dtypes of the codes: float16 halves the files and the bytes a search reads, at the
#: cost of rounding each stored code (searches compute in float32 either way).
CODE_DTYPES = {"float32": (np.float32, "F32"), "float16": (np.float16, "F16")}
LABEL_KINDS = ("class_ids", "multi_hot")


class SearchIndexError(ValueError):
    """An index path that is missing, not an index, corrupt, tampered with, or from another model."""


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type or dtype (a TypeError, and a ValueError like other bad input,
    so the command line reports it in one line)."""


class Hits(NamedTuple):
    """What :meth:`SearchIndex.search` returns, as faiss's ``search(q, k) -> (D, I)``.

    scores: [nq, k] float32 cosine similarities, best first (ties by ascending gallery row).
    ids: [nq, k] the gallery items' ids: an int64 tensor (the ids given at build time, or the
        gallery rows when none were given), or a numpy array of str for string ids.
    """

    scores: Tensor
    ids: Tensor | np.ndarray


def normalize_(codes: Tensor) -> Tensor:
    """L2-normalise the rows of codes [n, d] in place (F.normalize's arithmetic, without its
    copy); the one normalisation every stored code goes through."""
    return codes.div_(codes.norm(dim=1, keepdim=True).clamp_min(1e-12))


def rows_for_bytes(nbytes: int, dim: int) -> int:
    """Rows of float32 codes of width `dim` that fit in `nbytes` (at least 1)."""
    return max(1, int(nbytes) // (4 * max(int(dim), 1)))


def source_of(bundle: Bundle, modality: str) -> dict:
    """The provenance an index records for codes of `modality` encoded by `bundle`."""
    entry = next((m for m in bundle.manifest["modalities"] if m["name"] == modality), None)
    if entry is None:
        raise ValueError(f"bundle has no modality {modality!r}; it has: {', '.join(bundle.modality_names)}")
    return {
        "bundle": os.path.abspath(bundle.path),
        "projection_sha256": bundle.manifest["projection"]["sha256"],
        "modality": modality,
        "network_sha256": entry["sha256"],
    }


def check_bundle(source: dict, bundle: Bundle) -> None:
    """Raise SearchIndexError unless `bundle` is the model the index's codes came from (same P and the
    same network for the gallery modality; the path may differ, e.g. after a move)."""
    theirs = bundle.manifest["projection"]["sha256"]
    if theirs != source["projection_sha256"]:
        raise SearchIndexError(
            f"bundle {bundle.path} has another projection P than the bundle the index was built with "
            f"({source['bundle']}): its codes live in another space"
        )
    entry = next((m for m in bundle.manifest["modalities"] if m["name"] == source["modality"]), None)
    if entry is None or entry["sha256"] != source["network_sha256"]:
        raise SearchIndexError(
            f"bundle {bundle.path} does not hold the {source['modality']!r} network the index was built with "
            f"({source['bundle']}): use that bundle"
        )


# ---- argument checks ------------------------------------------------------------------------------


def check_features(x, name: str = "features"):
    """A 2-D real array (numpy, including a memory map, or a CPU/CUDA tensor) without grad.

    Returns it unchanged (no copy: a memory-mapped gallery stays on disk); values are checked for
    NaN/Inf block by block where they are encoded.
    """
    if isinstance(x, Tensor):
        if x.requires_grad:
            raise ValueError(f"{name} requires grad; pass {name}.detach() (search is not differentiable)")
        dtype_ok = x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        dtype = x.dtype
    else:
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (TypeError, ValueError) as exc:
                raise InputTypeError(f"{name} is not a numeric array ({exc})") from None
        dtype_ok = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
        dtype = x.dtype
    if not dtype_ok:
        raise InputTypeError(f"{name} must hold real numbers, got dtype {dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, D], got shape {tuple(x.shape)}")
    return x


def encode_blocks(bundle: Bundle, modality: str, x, block_rows: int) -> Iterator[tuple[int, Tensor]]:
    """(first row, codes [rows, d] float32 CPU) of raw features x [n, D] (checked by
    :func:`check_features`), `block_rows` rows at a time: only one block of a memory-mapped x is
    ever read into memory (copied, as torch needs writable memory)."""
    want = bundle.input_dim(modality)
    if x.shape[1] != want:
        raise ValueError(f"modality {modality!r} expects features of shape [n, {want}], got {tuple(x.shape)}")
    # Pages of a memory map that have been read stay mapped, and count as the process's resident
    # memory until the kernel needs them back; dropping them after each block keeps the resident
    # size at a block (the file stays in the page cache).
    mapping = getattr(x, "_mmap", None) if isinstance(x, np.memmap) else None
    for start in range(0, x.shape[0], block_rows):
        rows = x[start:start + block_rows]
        rows = rows.detach().cpu() if isinstance(rows, Tensor) else torch.from_numpy(np.array(rows))
        if mapping is not None and hasattr(mapping, "madvise"):
            mapping.madvise(mmap.MADV_DONTNEED)
        yield start, bundle.encode(modality, rows)


def check_ids(ids, n: int) -> tuple[str, np.ndarray | list[str] | None]:
    """(kind, values): ids given at build time for n gallery items; kind is one of ID_KINDS."""
    if ids is None:
        return "position", None
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids) if not isinstance(ids, np.ndarray) else ids
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"ids must be a sequence of {n} ids (one per gallery item), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        return "int", arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "U" or (arr.dtype == object and all(isinstance(v, str) for v in arr)):
        return "str", arr
    raise InputTypeError(f"ids must be all integers or all strings, got dtype {arr.dtype}")


def check_labels(labels, n: int) -> tuple[str | None, np.ndarray | None]:
    """(kind, array): class ids [n] int64 (-1 = unlabelled) or multi-hot [n, c] uint8."""
    if labels is None:
        return None, None
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"labels must be [{n}] class ids or [{n}, c] multi-hot rows, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == np.bool_):
        raise InputTypeError(f"labels must be numeric, got dtype {y.dtype}")
    if y.ndim == 2:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("multi-hot labels must contain only 0 and 1")
        return "multi_hot", y.astype(np.uint8)
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError("labels must be integer class ids")
    y = y.astype(np.int64)
    if y.size and y.min() < -1:
        raise ValueError(f"labels must be class ids >= -1 (-1 = unlabelled), got {int(y.min())}")
    return "class_ids", y


def check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputTypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the gallery has {n} items), got {k}")
    return int(k)


# ---- writing --------------------------------------------------------------------------------------


def write_new_file(path, write) -> Path:
    """Create the file `path` with ``write(tmp_path)``: written under a temporary name in the same
    directory, then hard-linked into place, which fails (FileExistsError) rather than replace a
    file that exists or appeared meanwhile; the temporary name is always removed."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"output {path} already exists; choose another path or remove it first")
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp)
        _publish(Path(tmp), 0o666)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"output {path} already exists; choose another path or remove it first") from None
    finally:
        os.unlink(tmp)
    return path


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class IndexWriter:
    """Append codes (with their ids and labels) to a new index directory, one shard at a time.

    Use as a context manager; leaving the block without an exception commits the index (writes
    index.json and renames the directory into place), an exception removes everything written.
    Memory: one shard buffer of `shard_rows` rows.

    Args:
        path: the new index directory; must not exist (or be an empty directory).
        source: provenance from :func:`source_of`.
        dim: code width d.
        shard_rows: rows per shard file (the last may hold fewer); default ~64 MiB of codes.
        id_kind: one of ID_KINDS; label_kind: one of LABEL_KINDS or None; num_classes: the
            multi-hot width.
        dtype: storage dtype of the codes, a key of CODE_DTYPES.
    """

    def __init__(self, path, source: dict, dim: int, *, shard_rows: int | None = None, id_kind: str = "position",
                 label_kind: str | None = None, num_classes: int | None = None, dtype: str = "float32"):
        if dtype not in CODE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(CODE_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        if shard_rows is not None and (isinstance(shard_rows, bool) or int(shard_rows) < 1):
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.path = check_new_bundle_path(path)
        self.source, self.dim = dict(source), int(dim)
        self.shard_rows = int(shard_rows) if shard_rows else rows_for_bytes(DEFAULT_SHARD_BYTES, dim)
        self.id_kind, self.label_kind, self.num_classes = id_kind, label_kind, num_classes
        self._tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-"))
        _publish(self._tmp, 0o777)
        self._shards: list[dict] = []
        self._codes: np.ndarray | None = None  # the shard being filled, allocated once
        self._pending: list[tuple[object, object]] = []  # its ids and labels
        self._pending_rows = 0
        self.rows = 0

    def append(self, codes: Tensor, ids=None, labels=None, *, normalized: bool = False) -> None:
        """Add rows: codes [r, d] (L2-normalised here unless `normalized` says they are: a second
        normalisation may change the last bit), their ids [r] and labels ([r] or [r, c])."""
        codes = codes.detach().to("cpu", torch.float32)
        if not normalized:
            codes = normalize_(codes.clone())
        if codes.dim() != 2 or codes.shape[1] != self.dim:
            raise ValueError(f"codes must be [r, {self.dim}], got {tuple(codes.shape)}")
        start = 0
        while start < codes.shape[0]:
            take = min(codes.shape[0] - start, self.shard_rows - self._pending_rows)
            cut = slice(start, start + take)
            if self._codes is None:
                self._codes = np.empty((self.shard_rows, self.dim), dtype=CODE_DTYPES[self.dtype][0])
            self._codes[self._pending_rows:self._pending_rows + take] = codes[cut].numpy()
            self._pending.append((None if ids is None else ids[cut], None if labels is None else labels[cut]))
            self._pending_rows += take
            start += take
            if self._pending_rows == self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if not self._pending_rows:
            return
        arrays = {"codes": self._codes[:self._pending_rows]}
        if self.id_kind == "int":
            arrays["ids"] = np.concatenate([i for i, _ in self._pending]).astype(np.int64)
        elif self.id_kind == "str":
            encoded = [str(s).encode("utf-8") for ids, _ in self._pending for s in ids]
            arrays["id_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in encoded], dtype=np.int64)])
            arrays["id_utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        if self.label_kind is not None:
            arrays["labels"] = np.concatenate([y for _, y in self._pending])
        name = _shard_name(len(self._shards))
        file = self._tmp / name
        # One metadata key (the format is in index.json): safetensors writes its metadata map in a
        # random order, so a second key would make the same shard a different file from build to build.
        save_file(arrays, str(file), metadata={"first_row": str(self.rows)})
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        _publish(file, 0o666)
        self._shards.append({"file": name, "rows": self._pending_rows, "sha256": _file_sha256(file)})
        self.rows += self._pending_rows
        self._pending, self._pending_rows = [], 0

    def commit(self) -> Path:
        self._flush()
        self._codes = None
        if self.rows == 0:
            raise ValueError("the gallery is empty: an index needs at least one item")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "source": self.source,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "ids": self.id_kind,
            "labels": self.label_kind,
            "num_classes": self.num_classes,
            "shards": self._shards,
        }
        _fsync_write_json(self._tmp / MANIFEST, manifest)
        try:
            os.rename(self._tmp, self.path)  # fails rather than replace a non-empty directory
        except OSError as exc:
            raise SearchIndexError(
                f"cannot move the finished index into place at {self.path}: {exc.strerror or exc}"
            ) from None
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


# ---- the index ------------------------------------------------------------------------------------


class SearchIndex:
    """A gallery of L2-normalised codes searchable by cosine similarity; see the module docstring.

    Make one with :func:`build_index` or :func:`load_index`. ``n`` items of width ``d``; the codes
    are held on the bundle's device (``in_memory``) or streamed from the shard files.
    """

    def __init__(self, bundle: Bundle, source: dict, *, codes: Tensor | None = None, path: Path | None = None,
                 manifest: dict | None = None, ids=None, id_kind: str = "position", labels=None,
                 label_kind: str | None = None, block_rows: int | None = None):
        self.bundle = bundle
        self.source = source
        self.device = bundle.device
        self.path = path
        self._codes = codes
        self._manifest = manifest
        self._ids, self.id_kind = ids, id_kind
        self._labels, self.label_kind = labels, label_kind
        if codes is not None:
            self.n, self.d = codes.shape
        else:
            self.n, self.d = int(manifest["rows"]), int(manifest["dim"])
            self._starts = np.cumsum([0] + [s["rows"] for s in manifest["shards"]])
        self.block_rows = block_rows

    @property
    def modality(self) -> str:
        """The gallery modality."""
        return self.source["modality"]

    @property
    def in_memory(self) -> bool:
        return self._codes is not None

    @property
    def block_rows(self) -> int:
        """Gallery rows per search block (default ~32 MiB of codes)."""
        return self._block_rows

    @block_rows.setter
    def block_rows(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or int(value) < 1):
            raise ValueError(f"block_rows must be >= 1, got {value}")
        self._block_rows = int(value) if value else rows_for_bytes(DEFAULT_BLOCK_BYTES, self.d)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else f"streamed from {self.path}"
        return f"SearchIndex({self.modality!r}, n={self.n}, d={self.d}, ids={self.id_kind}, {where}, device={self.device})"

    # -- blocks of codes -------------------------------------------------------------------------

    def _read_rows(self, start: int, stop: int, key: str = "codes") -> Tensor:
        """Rows [start, stop) of a per-row tensor stored in the shards, read through each
        shard's memory map (opened and closed per call, so nothing stays mapped)."""
        pieces = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for s in range(first, len(self._manifest["shards"])):
            lo = int(self._starts[s])
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, int(self._starts[s + 1])) - lo
            with safe_open(str(self.path / self._manifest["shards"][s]["file"]), "pt") as f:
                pieces.append(f.get_slice(key)[a:b])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """(first row, codes [rows, d] on the index's device) for consecutive gallery blocks."""
        for start in range(0, self.n, self.block_rows):
            stop = min(start + self.block_rows, self.n)
            if self.in_memory:
                yield start, self._codes[start:stop]
            else:
                yield start, self._read_rows(start, stop).to(self.device, torch.float32)

    def codes(self) -> Tensor:
        """All codes [n, d] float32 on the index's device (reads a streamed index into memory)."""
        return self._codes if self.in_memory else torch.cat([b for _, b in self.blocks()])

    # -- search ----------------------------------------------------------------------------------

    def search_codes(self, codes: Tensor, k: int) -> TopK:
        """Top k gallery rows for common-space codes [nq, d]: TopK(scores [nq, k] float32,
        indices [nq, k] int64 gallery rows), best first, ties by ascending row."""
        k = check_k(k, self.n)
        codes = check_features(codes, "codes")
        if codes.shape[1] != self.d:
            raise ValueError(f"codes must be [nq, {self.d}] (the index's width), got {tuple(codes.shape)}")
        q = torch.as_tensor(codes).to(self.device, torch.float32)
        if not bool(torch.isfinite(q).all()):
            raise ValueError("codes contain NaN or Inf")
        if q.shape[0] == 0:
            return TopK(torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64))
        best: TopK | None = None
        for start, block in self.blocks():
            top = cosine_topk(q, block, min(k, block.shape[0]))
            top = TopK(top.scores, top.indices + start)
            best = top if best is None else _merge(best, top, k)
        return TopK(best.scores.cpu(), best.indices.cpu())

    def encode(self, x, modality: str) -> Tensor:
        """Codes [nq, d] (on the index's device) of raw features x [nq, D] of `modality`."""
        x = check_features(x, "query features")
        if x.shape[0] == 0:
            return torch.zeros(0, self.d, device=self.device)
        parts = [c for _, c in encode_blocks(self.bundle, modality, x, rows_for_bytes(DEFAULT_BLOCK_BYTES, x.shape[1]))]
        return torch.cat(parts).to(self.device)

    def search(self, x, k: int, *, modality: str) -> Hits:
        """The k gallery items most similar to raw features x [nq, D] of `modality` (any modality
        of the bundle): Hits(scores [nq, k], ids [nq, k]), best first, ties by gallery row."""
        k = check_k(k, self.n)
        top = self.search_codes(self.encode(x, modality), k)
        return Hits(top.scores, self.ids_of(top.indices))

    # -- ids and labels --------------------------------------------------------------------------

    def _gather(self, rows: Tensor, key: str) -> np.ndarray:
        """Values of a stored per-row array at gallery rows [...], read shard by shard:
        [rows.numel(), ...] (an object array of str for string ids)."""
        flat = rows.reshape(-1).cpu().numpy()
        shard = np.searchsorted(self._starts, flat, side="right") - 1
        out = np.empty(0, dtype=object if key == "ids" and self.id_kind == "str" else np.int64)
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = flat[where] - int(self._starts[s])
            with safe_open(str(self.path / self._manifest["shards"][s]["file"]), "np") as f:
                if key == "ids" and self.id_kind == "str":
                    offsets, blob = f.get_tensor("id_offsets"), f.get_slice("id_utf8")
                    values = np.array([bytes(blob[int(offsets[r]):int(offsets[r + 1])]).decode("utf-8") for r in local],
                                      dtype=object)
                else:
                    values = f.get_tensor(key)[local]
            if out.shape[0] != flat.size:
                out = np.empty((flat.size, *values.shape[1:]), dtype=values.dtype)
            out[where] = values
        return out

    def ids_of(self, rows: Tensor) -> Tensor | np.ndarray:
        """The ids of gallery rows [...]: int64 tensor (int ids or rows) or numpy str array."""
        if self.id_kind == "position":
            return rows.cpu().clone()
        if self.in_memory:
            values = self._ids[rows.reshape(-1).cpu().numpy()]  # rows may be on the index's device
        else:
            values = self._gather(rows, "ids")
        if self.id_kind == "int":
            return torch.from_numpy(np.asarray(values, dtype=np.int64)).reshape(rows.shape)
        return np.asarray(values, dtype=str).reshape(tuple(rows.shape))

    def labels_of(self, rows: Tensor) -> Tensor:
        """Gallery labels at rows [nq, k]: [nq, k] class ids or [nq, k, c] multi-hot."""
        if self.label_kind is None:
            raise ValueError("the index has no gallery labels (give labels= when building it)")
        if self.in_memory:
            values = self._labels[rows.reshape(-1).cpu().numpy()]  # rows may be on the index's device
        else:
            values = self._gather(rows, "labels")
        return torch.from_numpy(np.asarray(values)).reshape(*rows.shape, *np.shape(values)[1:])

    # -- saving ----------------------------------------------------------------------------------

    def save(self, path, *, shard_rows: int | None = None, dtype: str = "float32") -> Path:
        """Write the index to a new directory `path` (never replaces anything); returns it.
        `dtype`: storage dtype of the codes (see CODE_DTYPES)."""
        num_classes = None if self.label_kind != "multi_hot" else self._num_classes()
        with IndexWriter(path, self.source, self.d, shard_rows=shard_rows, id_kind=self.id_kind,
                         label_kind=self.label_kind, num_classes=num_classes, dtype=dtype) as writer:
            for start, block in self.blocks():
                rows = torch.arange(start, start + block.shape[0])
                ids = None if self.id_kind == "position" else self._stored(rows, "ids")
                labels = None if self.label_kind is None else self._stored(rows, "labels")
                writer.append(block, ids, labels, normalized=True)
        return writer.path

    def _stored(self, rows: Tensor, key: str) -> np.ndarray:
        """The stored ids or labels of consecutive gallery rows, as given at build time."""
        if self.in_memory:
            return (self._ids if key == "ids" else self._labels)[rows.numpy()]
        if key == "ids" and self.id_kind == "str":
            return self._gather(rows, "ids")
        return self._read_rows(int(rows[0]), int(rows[-1]) + 1, key).numpy()

    def _num_classes(self) -> int:
        return int(self._labels.shape[1]) if self.in_memory else int(self._manifest["num_classes"])


def _merge(a: TopK, b: TopK, k: int) -> TopK:
    """The best k of two candidate lists whose rows are ordered best first, ties by index, where
    every index in `a` is below every index in `b`: a stable sort keeps that tie order."""
    scores = torch.cat([a.scores, b.scores], dim=1)
    indices = torch.cat([a.indices, b.indices], dim=1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return TopK(scores.gather(1, order), indices.gather(1, order))


def _open_bundle(bundle, device) -> Bundle:
    if isinstance(bundle, Bundle):
        return bundle
    return load(bundle, device if device is not None else "cpu")


def build_index(bundle: Bundle | str | os.PathLike, modality: str, features, *, ids=None, labels=None, path=None,
                shard_rows: int | None = None, block_rows: int | None = None, dtype: str = "float32") -> SearchIndex:
    """Encode a gallery and make it searchable.

    Args:
        bundle: a loaded :class:`~sdml_ext.Bundle` (its device is the index's) or a bundle path.
        modality: the gallery's modality (one of the bundle's).
        features: [n, D] raw features (numpy array or memory map, or a tensor), encoded in blocks
            of `block_rows` rows, so a memory-mapped gallery never needs to fit in memory.
        ids: optional [n] ids returned by searches (ints or strings); default: the gallery row.
        labels: optional [n] class ids (-1 = unlabelled) or [n, c] multi-hot rows (for P@k / mAP).
        path: when given, the index is written there (shard by shard, never replacing anything)
            and returned streaming from disk; otherwise it is kept in memory.
        shard_rows: rows per shard file (default ~64 MiB of codes); block_rows: rows per encode
            and search block (default ~32 MiB of codes).
        dtype: storage dtype of the codes on disk (with `path`), "float32" or "float16" (see
            CODE_DTYPES); an index in memory holds float32.
    """
    bundle = _open_bundle(bundle, None)
    source = source_of(bundle, modality)
    features = check_features(features, "features")
    n = features.shape[0]
    if n == 0:
        raise ValueError("the gallery is empty: features has 0 rows")
    id_kind, id_values = check_ids(ids, n)
    label_kind, label_values = check_labels(labels, n)
    dim = int(bundle.P.shape[0])
    if block_rows is not None and (isinstance(block_rows, bool) or int(block_rows) < 1):
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    block = int(block_rows) if block_rows else rows_for_bytes(DEFAULT_BLOCK_BYTES, max(dim, features.shape[1]))
    encoded = encode_blocks(bundle, modality, features, block)
    if path is None:
        codes = torch.cat([normalize_(c) for _, c in encoded]).to(bundle.device)
        ids_in_memory = id_values if id_kind != "str" else np.asarray(id_values, dtype=object)
        return SearchIndex(bundle, source, codes=codes, ids=ids_in_memory,
                           id_kind=id_kind, labels=label_values, label_kind=label_kind, block_rows=block_rows)
    num_classes = int(label_values.shape[1]) if label_kind == "multi_hot" else None
    with IndexWriter(path, source, dim, shard_rows=shard_rows, id_kind=id_kind, label_kind=label_kind,
                     num_classes=num_classes, dtype=dtype) as writer:
        for start, codes in encoded:
            stop = start + codes.shape[0]
            writer.append(normalize_(codes), None if id_values is None else id_values[start:stop],
                          None if label_values is None else label_values[start:stop], normalized=True)
    return load_index(writer.path, bundle, block_rows=block_rows, verify=False)


def read_index_manifest(path) -> dict:
    """The index.json of the index at `path`; SearchIndexError if it is not a readable index."""
    path = Path(path)
    file = path / MANIFEST
    manifest = read_directory_manifest(path, MANIFEST, "search index", SearchIndexError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SearchIndexError(f"{file}: not an SDML search index (format is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SearchIndexError(f"{file}: index format version {manifest.get('format_version')} is not supported "
                               f"(this sdml_ext reads version {FORMAT_VERSION})")
    try:
        shards = manifest["shards"]
        ok = (isinstance(manifest["rows"], int) and isinstance(manifest["dim"], int) and manifest["ids"] in ID_KINDS
              and manifest["dtype"] in CODE_DTYPES
              and manifest["labels"] in (None, *LABEL_KINDS) and isinstance(shards, list) and shards
              and sum(int(s["rows"]) for s in shards) == manifest["rows"]
              and all(isinstance(s["file"], str) and "/" not in s["file"] and not s["file"].startswith(".") for s in shards)
              and {"bundle", "projection_sha256", "modality", "network_sha256"} <= set(manifest["source"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SearchIndexError(f"{file}: malformed index manifest ({exc})") from None
    if not ok:
        raise SearchIndexError(f"{file}: malformed index manifest (inconsistent rows, shards, ids or labels)")
    return manifest


def _check_shard(path: Path, shard: dict, first_row: int, manifest: dict, verify: bool) -> None:
    """Raise SearchIndexError unless the shard file exists, matches its checksum (if `verify`),
    holds the arrays index.json promises and starts at the row index.json places it at."""
    file = path / shard["file"]
    if not file.is_file():
        raise SearchIndexError(f"index file missing: {file}")
    if verify and _file_sha256(file) != shard["sha256"]:
        raise SearchIndexError(f"{file} does not match its checksum in {MANIFEST} (corrupt or tampered with)")
    rows, dim = int(shard["rows"]), int(manifest["dim"])
    want = {"codes": ([rows, dim], CODE_DTYPES[manifest["dtype"]][1])}
    if manifest["ids"] == "int":
        want["ids"] = ([rows], "I64")
    elif manifest["ids"] == "str":
        want["id_offsets"] = ([rows + 1], "I64")
    if manifest["labels"] == "class_ids":
        want["labels"] = ([rows], "I64")
    elif manifest["labels"] == "multi_hot":
        want["labels"] = ([rows, manifest["num_classes"]], "U8")
    try:
        with safe_open(str(file), "np") as f:
            stored = (f.metadata() or {}).get("first_row")
            if stored != str(first_row):
                raise SearchIndexError(f"{file} holds rows from {stored}, but {MANIFEST} places it at row {first_row}")
            for key, (shape, dtype) in want.items():
                s = f.get_slice(key)
                if list(s.get_shape()) != shape or s.get_dtype() != dtype:
                    raise SearchIndexError(f"{file}: {key!r} is {s.get_dtype()} {s.get_shape()}, expected {dtype} {shape}")
    except SearchIndexError:
        raise
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise SearchIndexError(f"{file}: unreadable safetensors file ({exc})") from None


def load_index(path, bundle: Bundle | str | os.PathLike | None = None, *, in_memory: bool = False,
               device=None, block_rows: int | None = None, verify: bool = True) -> SearchIndex:
    """Open the index at `path`.

    Args:
        bundle: the bundle whose networks encode queries (a :class:`~sdml_ext.Bundle` or a path;
            default: the path recorded in the index). It must be the model the index was built
            with (same P and gallery network), else SearchIndexError.
        in_memory: read all codes onto the bundle's device (fast repeated searches, e.g. on a
            GPU); by default they are streamed from the shard files at every search.
        device: device of a bundle opened from a path (default cpu).
        block_rows: gallery rows per search block.
        verify: check every file's sha256 against index.json (one pass over the files).
    """
    path = Path(path)
    manifest = read_index_manifest(path)
    first_row = 0
    for shard in manifest["shards"]:
        _check_shard(path, shard, first_row, manifest, verify)
        first_row += int(shard["rows"])
    if bundle is None:
        bundle = manifest["source"]["bundle"]
        if not os.path.isdir(bundle):
            raise SearchIndexError(f"the bundle the index was built with is not at {bundle} (moved?); pass the "
                                   "bundle (--bundle on the command line)")
    bundle = _open_bundle(bundle, device)
    check_bundle(manifest["source"], bundle)
    if int(bundle.P.shape[0]) != manifest["dim"]:
        raise SearchIndexError(
            f"{path}: codes have width {manifest['dim']} but the bundle's common space has {bundle.P.shape[0]}"
        )
    index = SearchIndex(bundle, manifest["source"], path=path, manifest=manifest, id_kind=manifest["ids"],
                        label_kind=manifest["labels"], block_rows=block_rows)
    if not in_memory:
        return index
    rows = torch.arange(index.n)
    ids = None if index.id_kind == "position" else index._stored(rows, "ids")
    labels = None if index.label_kind is None else index._stored(rows, "labels")
    return SearchIndex(bundle, manifest["source"], codes=index.codes(), path=path, ids=ids, id_kind=index.id_kind,
                       labels=labels, label_kind=index.label_kind, block_rows=block_rows)


def hit_quality(index: SearchIndex, top: TopK, query_labels) -> dict:
    """P@k and mAP@k of queries from their top-k rows and labels (gallery labels from the index).

    Relevant means the same class id (>= 0) or, for multi-hot rows, a shared class. AP@k divides
    by the relevant items within k and a query without any scores 0 (the defaults of
    :func:`sdml_ext.ops.average_precision`, which ranks a whole in-memory gallery and gives the same
    values); computed from the hit list, so it works for a streamed gallery too.

    Args:
        top: TopK of :meth:`SearchIndex.search_codes`, indices [nq, k].
        query_labels: [nq] class ids or [nq, c] multi-hot rows, the kind the index's labels are.
    Returns: {"k", "queries", "precision_at_k", "map_at_k"}.
    """
    nq, k = top.indices.shape
    if nq == 0:
        raise ValueError("no queries to score")
    kind, ql = check_labels(query_labels, nq)
    if kind != index.label_kind:
        raise ValueError(f"query labels are {kind} but the index's gallery labels are {index.label_kind}")
    gl = index.labels_of(top.indices)
    ql = torch.from_numpy(ql)
    if kind == "class_ids":
        rel = (gl == ql[:, None]) & (ql[:, None] >= 0)
    else:
        if gl.shape[-1] != ql.shape[1]:
            raise ValueError(f"query labels have {ql.shape[1]} classes, the index's {gl.shape[-1]}")
        rel = ((gl != 0) & (ql[:, None, :] != 0)).any(dim=2)
    rel = rel.double()
    hits = rel.sum(dim=1)
    precision = rel.cumsum(dim=1) / torch.arange(1, k + 1, dtype=torch.float64)
    ap = torch.where(hits > 0, (precision * rel).sum(dim=1) / hits.clamp(min=1), torch.zeros_like(hits))
    return {"k": k, "queries": nq, "precision_at_k": float((hits / k).mean()), "map_at_k": float(ap.mean())}
