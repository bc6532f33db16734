"""sdml_ext's own dataset layout: named arrays in one .npz, .h5/.hdf5 or .mat file, or in a
directory of .npy files (one `{key}.npy` per key).

Keys (m = modality name, s = split, one of train / val / test):

    {m}_{s}_x     (n, D) real features (any float/int dtype; loaded as float32)
    {m}_{s}_y     (n,) integer class ids in [0, c), -1 = unlabelled sample
                  or (n, c) 0/1 multi-hot rows, an all-zero row = unlabelled sample
    class_names   optional (c,) strings; default "0".."c-1"
    modalities    optional (m,) strings: which modalities, in order; default every modality
                  with keys, in key order (alphabetical in .h5 files and directories)
    name, source  optional strings: dataset name (default the file stem) and attribution

Every modality needs {m}_train_x and {m}_train_y; a modality without val or test keys gets an
empty split. Sample counts may differ between modalities and splits (SDML needs no pairing).
Without class_names, c is the multi-hot width or 1 + the largest class id.

Format notes: .h5 files hold one dataset per key at the root, row-major as h5py writes numpy
arrays. .mat files may be v5 (scipy.io.savemat) or v7.3; MATLAB's (1, n) / (n, 1) id vectors are
accepted, and MATLAB variable names must start with a letter (name a modality "x3d", not "3d").

save_npz writes this layout; load_generic reads it.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Sequence

import numpy as np

from ..errors import MissingKeyError
from ..store.files import write_atomic
from ._io import ArrayFile, naming_file, strings
from .dataset import SPLIT_NAMES, Dataset, DatasetInfo, Modality, Split, default_class_names

_KEY = re.compile(r"^(?P<modality>.+)_(?P<split>train|val|test)_(?P<part>x|y)$")


def load_generic(path: str | os.PathLike, fmt: str | None = None) -> Dataset:
    """Load a dataset stored in the layout described in this module's docstring.

    Args:
        path: .npz, .h5/.hdf5 or .mat file, or a directory of .npy files.
        fmt: "npz", "h5", "mat" or "dir" to override the extension.
    """
    return read_generic(path, fmt)


def read_generic(path: str | os.PathLike, fmt: str | None = None, only: Sequence[str] | None = None) -> Dataset:
    """load_generic, keeping only the modalities `only` (default all) and reading only their
    keys: of the other modalities nothing is read but the arrays' headers (shapes) and, when the
    file has no class_names key and its labels are class ids, their label vectors (to count the
    classes). The result is the full load's modalities `only`, with the full load's classes."""
    with ArrayFile(path, fmt) as f, naming_file(f.path):
        names = _modality_names(f)
        chosen = names if only is None else _chosen(names, only, f.path)
        raw = {name: {s: _read_split(f, name, s) for s in SPLIT_NAMES} for name in chosen}
        class_names, multilabel = _classes(f, names, raw)
        modalities = []
        for name, splits in raw.items():
            train = splits["train"]
            dim = np.shape(train[0])[1] if np.ndim(train[0]) == 2 else 0
            empty = Split.empty(dim, len(class_names) if multilabel else None) if dim else None
            modalities.append(
                Modality(name, train, splits["val"] or empty, splits["test"] or empty)
            )
        return Dataset(
            _scalar(f, "name", _default_name(f)),
            modalities,
            class_names,
            multilabel=multilabel,
            source=_scalar(f, "source", ""),
        )


def describe_generic(path: str | os.PathLike, fmt: str | None = None) -> DatasetInfo:
    """The DatasetInfo of a generic-layout file from its arrays' headers (a v5 .mat file is
    read whole; label vectors are read only as read_generic says)."""
    with ArrayFile(path, fmt) as f, naming_file(f.path):
        names = _modality_names(f)
        class_names, multilabel = _classes(f, names, {})
        shapes = {}
        for name in names:
            shape = f.shape(f"{name}_train_x")
            shapes[name] = (shape[0], shape[1]) if len(shape) == 2 else (0, 0)
        return DatasetInfo(_scalar(f, "name", _default_name(f)), tuple(class_names), multilabel, shapes)


def _modality_names(f: ArrayFile) -> list[str]:
    keys = f.keys()
    if "modalities" in f:
        names = strings(f["modalities"])
    else:
        names = list(dict.fromkeys(m.group("modality") for m in map(_KEY.match, keys) if m))
    if not names:
        raise MissingKeyError(
            f"{f.path}: no keys of the form {{modality}}_{{split}}_x / _y; keys present: "
            f"{', '.join(keys) or '(none)'}"
        )
    return names


def _chosen(names: list[str], only: Sequence[str], path: str) -> list[str]:
    missing = [n for n in only if n not in names]
    if missing:
        raise ValueError(f"{path} has no modality {missing[0]!r}; present: {', '.join(names)}")
    return list(only)


def _default_name(f: ArrayFile) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(f.path)))[0]


def _label_keys(f: ArrayFile, names: list[str]) -> list[tuple[str, int]]:
    """(label key, rows of its features) of every split the full load keeps, from headers."""
    out = []
    for name in names:
        for split in SPLIT_NAMES:
            x_key, y_key = f"{name}_{split}_x", f"{name}_{split}_y"
            if split != "train" and x_key not in f and y_key not in f:
                continue
            x_shape = f.shape(x_key)  # MissingKeyError names it
            if split != "train" and int(np.prod(x_shape)) == 0:
                continue
            out.append((y_key, x_shape[0] if len(x_shape) == 2 else 0))
    return out


def _classes(f: ArrayFile, names: list[str], raw: dict) -> tuple[list[str], bool]:
    """(class names, multilabel) of the whole file: from label headers, and from the label
    vectors themselves only when the file has no class_names key and its labels are ids."""
    shapes = []
    for key, n in _label_keys(f, names):
        shape = f.shape(key)
        if len(shape) == 2 and 1 in shape and int(np.prod(shape)) == n:
            shape = (n,)  # MATLAB stores id vectors as (1, n) or (n, 1)
        shapes.append((key, shape))
    multilabel = any(len(shape) == 2 for _, shape in shapes)
    if "class_names" in f:
        return strings(f["class_names"]), multilabel
    if multilabel:
        return default_class_names(max(shape[1] for _, shape in shapes if len(shape) == 2)), True
    read = {f"{name}_{split}_y": pair[1] for name, splits in raw.items() for split, pair in splits.items() if pair}
    largest = -1
    for key, _ in shapes:
        y = read[key] if key in read else np.asarray(f[key])
        if y.size:
            largest = max(largest, int(y.max()))
    if largest < 0:
        raise ValueError("no labelled sample and no class_names key: cannot tell c")
    return default_class_names(largest + 1), False


def to_arrays(dataset: Dataset) -> dict[str, np.ndarray]:
    """The dataset as the key -> array dict of the layout (features float32, labels as stored)."""
    arrays: dict[str, np.ndarray] = {}
    for modality in dataset.modalities:
        for split_name, split in modality.splits():
            arrays[f"{modality.name}_{split_name}_x"] = split.features
            arrays[f"{modality.name}_{split_name}_y"] = split.labels
    arrays["modalities"] = np.array(dataset.modality_names, dtype=str)
    arrays["class_names"] = np.array(dataset.class_names, dtype=str)
    arrays["name"] = np.array(dataset.name, dtype=str)
    arrays["source"] = np.array(dataset.source, dtype=str)
    return arrays


def save_npz(dataset: Dataset, path: str | os.PathLike) -> None:
    """Write `dataset` to `path` as a compressed .npz in this layout, atomically.

    The archive replaces `path` atomically (sdml_ext.store.files.write_atomic), so readers never
    see a partial file. `path` is used as given (no ".npz" is
    appended).
    """
    path = os.fspath(path)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **to_arrays(dataset))
    write_atomic(path, buffer.getbuffer())


def _read_split(f: ArrayFile, modality: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(features, labels) for one split, None when neither key exists (train is required)."""
    x_key, y_key = f"{modality}_{split}_x", f"{modality}_{split}_y"
    if split != "train" and x_key not in f and y_key not in f:
        return None
    x, y = f[x_key], f[y_key]  # MissingKeyError names whichever is absent
    x = np.asarray(x)
    y = np.asarray(y)
    n = x.shape[0] if x.ndim == 2 else 0
    if x.size == 0:
        return None if split != "train" else (x, y)
    if y.ndim == 2 and 1 in y.shape and y.size == n:
        y = y.reshape(-1)  # MATLAB stores id vectors as (1, n) or (n, 1)
    return x, y


def _scalar(f: ArrayFile, key: str, default: str) -> str:
    if key not in f:
        return default
    values = strings(f[key])
    return values[0] if values else default
