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
directory and renamed into place: :mod:`sdml_ext.search.writer`). Loading reads JSON and safetensors only (never pickle) and
verifies every file's sha256 (``verify=False`` skips that pass over the files of a huge trusted
index). An index knows the bundle it came from and refuses a bundle with another P or another
network for the gallery modality: codes from another model live in another space (the format
and its checks: :mod:`sdml_ext.search.format`; argument checks: :mod:`sdml_ext.search.checks`;
P@k / mAP@k of hits: :mod:`sdml_ext.search.quality`).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import InputTypeError, SearchIndexError  # noqa: F401  (re-exported)
from ..ops.retrieval import TopK, cosine_topk
from ..store.bundle import Bundle, load
from .checks import check_features, check_ids, check_k, check_labels
from .format import (  # noqa: F401  (re-exported: the format's names)
    CODE_DTYPES,
    DEFAULT_BLOCK_BYTES,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_VERSION,
    ID_KINDS,
    LABEL_KINDS,
    MANIFEST,
    check_bundle,
    check_shard,
    read_index_manifest,
    rows_for_bytes,
    source_of,
)
from .writer import IndexWriter, normalize_


class Hits(NamedTuple):
    """What :meth:`SearchIndex.search` returns, as faiss's ``search(q, k) -> (D, I)``.

    scores: [nq, k] float32 cosine similarities, best first (ties by ascending gallery row).
    ids: [nq, k] the gallery items' ids: an int64 tensor (the ids given at build time, or the
        gallery rows when none were given), or a numpy array of str for string ids.
    """

    scores: Tensor
    ids: Tensor | np.ndarray


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

    @property
    def shard_count(self) -> int:
        """Shard files of an index on disk (0 for one built in memory)."""
        return 0 if self._manifest is None else len(self._manifest["shards"])

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
        check_shard(path, shard, first_row, manifest, verify)
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
