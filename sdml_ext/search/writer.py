"""Writing a new search index directory, shard by shard (see :mod:`sdml_ext.search.index` for the
layout): assembled in a temporary sibling directory and published by rename, never replacing
anything (sdml_ext.store.files.new_directory)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import Tensor

from ..errors import SearchIndexError
from ..store.bundle import check_new_bundle_path, versions
from ..store.files import NewDirectory, fsync_file, publish, sha256_file, write_json, writing
from .format import CODE_DTYPES, DEFAULT_SHARD_BYTES, FORMAT, FORMAT_VERSION, MANIFEST, rows_for_bytes, shard_name


def normalize_(codes: Tensor) -> Tensor:
    """L2-normalise the rows of codes [n, d] in place (F.normalize's arithmetic, without its
    copy); the one normalisation every stored code goes through."""
    return codes.div_(codes.norm(dim=1, keepdim=True).clamp_min(1e-12))


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
        self._directory = NewDirectory(self.path, SearchIndexError, "index")
        self._tmp = self._directory.tmp
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
        name = shard_name(len(self._shards))
        file = self._tmp / name
        # One metadata key (the format is in index.json): safetensors writes its metadata map in a
        # random order, so a second key would make the same shard a different file from build to build.
        with writing(self.path / name):  # named where the user will look for it
            save_file(arrays, str(file), metadata={"first_row": str(self.rows)})
            fsync_file(file)
        publish(file, 0o666)
        self._shards.append({"file": name, "rows": self._pending_rows, "sha256": sha256_file(file)})
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
        write_json(self._tmp / MANIFEST, manifest, shown_as=self.path / MANIFEST)
        return self._directory.publish()  # fails rather than replace a non-empty directory

    def abort(self) -> None:
        self._directory.abort()

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
