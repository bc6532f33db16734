"""The on-disk format of a search index (see :mod:`sdml_ext.search.index` for the layout) and its
checks: the manifest's schema, each shard's header and checksum, and the provenance that ties an
index to the bundle whose codes it holds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ..errors import SearchIndexError
from ..store.bundle import Bundle
from ..store.files import read_directory_manifest, sha256_file

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


def rows_for_bytes(nbytes: int, dim: int) -> int:
    """Rows of float32 codes of width `dim` that fit in `nbytes` (at least 1)."""
    return max(1, int(nbytes) // (4 * max(int(dim), 1)))


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def source_of(bundle: Bundle, modality: str) -> dict:
    """The provenance an index records for codes of `modality` encoded by `bundle`."""
    network = bundle.network_sha256(modality)  # ValueError naming the bundle's modalities
    return {
        "bundle": os.path.abspath(bundle.path),
        "projection_sha256": bundle.projection_sha256,
        "modality": modality,
        "network_sha256": network,
    }


def check_bundle(source: dict, bundle: Bundle) -> None:
    """Raise SearchIndexError unless `bundle` is the model the index's codes came from (same P and the
    same network for the gallery modality; the path may differ, e.g. after a move)."""
    if bundle.projection_sha256 != source["projection_sha256"]:
        raise SearchIndexError(
            f"bundle {bundle.path} has another projection P than the bundle the index was built with "
            f"({source['bundle']}): its codes live in another space"
        )
    modality = source["modality"]
    if modality not in bundle.modality_names or bundle.network_sha256(modality) != source["network_sha256"]:
        raise SearchIndexError(
            f"bundle {bundle.path} does not hold the {modality!r} network the index was built with "
            f"({source['bundle']}): use that bundle"
        )


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


def check_shard(path: Path, shard: dict, first_row: int, manifest: dict, verify: bool) -> None:
    """Raise SearchIndexError unless the shard file exists, matches its checksum (if `verify`),
    holds the arrays index.json promises and starts at the row index.json places it at."""
    file = path / shard["file"]
    if not file.is_file():
        raise SearchIndexError(f"index file missing: {file}")
    if verify and sha256_file(file) != shard["sha256"]:
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
