"""Loaders for the file formats the SDML authors and the multi-view literature distribute.

- load_xmedia: PKU XMedia as a MATLAB .mat (v5 or v7.3) with the authors' keys, 5 modalities.
- load_authors_h5: the authors' Wikipedia / NUS-WIDE / MS-COCO HDF5 files, 2 modalities.
- load_multiview_mat: multi-view-clustering .mat files (a cell array of views + a label vector),
  e.g. MSRC-v1, BBCSport; views may be sparse.

Every loader returns a Dataset with float32 features, raises FileNotFoundError for a missing file,
MissingKeyError (a KeyError and a ValueError) naming the key, the file and the keys present, and
ValueError naming the file for unreadable content.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ._io import ArrayFile, class_ids, dense, naming_file
from .dataset import Dataset, DatasetInfo, Modality, default_class_names
from .splits import DEFAULT_FRACTIONS, split_paired_views

XMEDIA_KEYS = {
    # modality: (train features, test features, train labels, test labels); labels 1-based.
    "image": ("I_tr_CNN", "I_te_CNN", "trImgCat", "teImgCat"),
    "text": ("T_tr_BOW", "T_te_BOW", "trTxtCat", "teTxtCat"),
    "audio": ("A_tr", "A_te", "trAudCat", "teAudCat"),
    "3d": ("d3_tr", "d3_te", "tr3dCat", "te3dCat"),
    "video": ("V_tr_CNN", "V_te_CNN", "trVidCat", "teVidCat"),
}

AUTHORS_H5_KEYS = {
    # modality: (train features, train labels, test features, test labels)
    "image": ("train_imgs_deep", "train_imgs_labels", "test_imgs_deep", "test_imgs_labels"),
    "text": ("train_text", "train_texts_labels", "test_text", "test_texts_labels"),
}

AUTHORS_H5_N_VAL = {"wikipedia": 231, "nus-wide": 5000, "mscoco": 10000}
"""Validation items taken from the head of each modality's official test set (sdml.md)."""

MULTIVIEW_VIEW_KEYS = ("fea", "X")
MULTIVIEW_LABEL_KEYS = ("gt", "Y")


def load_xmedia(
    path: str | os.PathLike,
    *,
    modalities: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """Load the authors' PKU XMedia .mat file (keys in XMEDIA_KEYS).

    Split (the authors'): train = the file's training set; each modality's test set is cut in
    half, the first ceil(n/2) rows are the test split and the rest the validation split
    (500/500, 500/500, 100/100, 50/50, 87/87 for image/text/audio/3d/video).

    Args:
        modalities: subset of "image", "text", "audio", "3d", "video" to load (default all).
        class_names: names for the c classes; default the file's 1-based ids "1".."c".

    Returns:
        Dataset "xmedia": int64 labels = file ids - 1, c = largest id in the file.
    """
    names = list(XMEDIA_KEYS if modalities is None else modalities)
    unknown = [m for m in names if m not in XMEDIA_KEYS]
    if unknown or not names:
        raise ValueError(f"unknown XMedia modalities {unknown}; valid: {', '.join(XMEDIA_KEYS)}")
    with ArrayFile(path, "mat") as f, naming_file(f.path):
        parts = {}
        for name in names:
            x_tr, x_te, y_tr, y_te = XMEDIA_KEYS[name]
            train = _rows(f, x_tr, y_tr)
            test = _rows(f, x_te, y_te)
            parts[name] = (train, test)
        all_ids = np.concatenate([y for tr, te in parts.values() for y in (tr[1], te[1])])
        if all_ids.min() < 1:
            raise ValueError(f"XMedia class ids must be 1-based, found {all_ids.min()}")
        c = int(all_ids.max())
        built = []
        for name, ((x_train, y_train), (x_test, y_test)) in parts.items():
            n_test = (x_test.shape[0] + 1) // 2
            built.append(
                Modality(
                    name,
                    (x_train, y_train - 1),
                    (x_test[n_test:], y_test[n_test:] - 1),
                    (x_test[:n_test], y_test[:n_test] - 1),
                )
            )
        return Dataset(
            "xmedia",
            built,
            [str(i) for i in range(1, c + 1)] if class_names is None else class_names,
            multilabel=False,
            source=f"PKU XMedia, authors' .mat file {f.path}",
        )


def load_authors_h5(
    path: str | os.PathLike,
    n_val: int,
    *,
    name: str = "authors-h5",
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """Load an HDF5 file in the SDML authors' layout (keys in AUTHORS_H5_KEYS).

    Labels are either class ids, stored (n,) or (n, 1) and shifted so the smallest id in the file
    becomes 0 (the files may count from 1), or (n, c) 0/1 multi-hot rows (MS-COCO).

    Split (the authors'): train = the file's training set; the first `n_val` rows of each
    modality's test set are the validation split, the rest the test split (see
    AUTHORS_H5_N_VAL for the published counts).

    Args:
        n_val: validation rows taken from the head of each test set.
        name: dataset name, e.g. "wikipedia".
        class_names: names for the c classes; default the file's ids (or "0".."c-1" for
            multi-hot labels).
    """
    return read_authors_h5(path, n_val, name=name, class_names=class_names)


def read_authors_h5(
    path: str | os.PathLike,
    n_val: int,
    *,
    name: str = "authors-h5",
    class_names: Sequence[str] | None = None,
    only: Sequence[str] | None = None,
) -> Dataset:
    """load_authors_h5 keeping only the modalities `only` (default both) and reading only their
    features; both modalities' label vectors are read (the class ids are counted over all)."""
    if n_val < 0:
        raise ValueError(f"n_val must be >= 0, got {n_val}")
    chosen = list(AUTHORS_H5_KEYS if only is None else only)
    unknown = [m for m in chosen if m not in AUTHORS_H5_KEYS]
    if unknown:
        raise ValueError(f"the authors' HDF5 layout has no modality {unknown[0]!r}; present: {', '.join(AUTHORS_H5_KEYS)}")
    with ArrayFile(path, "h5") as f, naming_file(f.path):
        labels, multilabel, default_names = _authors_classes(f)
        modalities = []
        for modality in chosen:
            x_tr, _, x_te, _ = AUTHORS_H5_KEYS[modality]
            x_train, x_test = f[x_tr], f[x_te]
            y_train, y_test = labels[modality]
            if n_val > x_test.shape[0]:
                raise ValueError(
                    f"n_val={n_val} exceeds the {x_test.shape[0]} rows of test key {x_te!r}"
                )
            modalities.append(
                Modality(
                    modality,
                    (x_train, y_train),
                    (x_test[:n_val], y_test[:n_val]),
                    (x_test[n_val:], y_test[n_val:]),
                )
            )
        return Dataset(
            name,
            modalities,
            default_names if class_names is None else class_names,
            multilabel=multilabel,
            source=f"SDML authors' HDF5 file {f.path}",
        )


def describe_authors_h5(
    path: str | os.PathLike, *, name: str = "authors-h5", class_names: Sequence[str] | None = None
) -> DatasetInfo:
    """The DatasetInfo of an authors' HDF5 file: feature shapes from the headers, classes from
    the label vectors."""
    with ArrayFile(path, "h5") as f, naming_file(f.path):
        _, multilabel, default_names = _authors_classes(f)
        shapes = {}
        for modality, (x_tr, _, _, _) in AUTHORS_H5_KEYS.items():
            shape = f.shape(x_tr) if x_tr in f else f[x_tr]  # MissingKeyError names it
            shapes[modality] = (shape[0], shape[1]) if len(shape) == 2 else (0, 0)
        names = default_names if class_names is None else class_names
        return DatasetInfo(name, tuple(str(c) for c in names), multilabel, shapes)


def _authors_classes(f: ArrayFile) -> tuple[dict, bool, list[str]]:
    """Every modality's (train, test) labels (ids shifted to start at 0), multilabel, and the
    default class names."""
    labels = {
        modality: [_authors_labels(f[key], key) for key in (y_tr, y_te)]
        for modality, (_, y_tr, _, y_te) in AUTHORS_H5_KEYS.items()
    }
    every = [y for pair in labels.values() for y in pair]
    if len({y.ndim for y in every}) > 1:
        raise ValueError("label keys mix class-id vectors and multi-hot matrices")
    if every[0].ndim == 2:
        return labels, True, default_class_names(every[0].shape[1])
    ids = np.concatenate(every)
    lowest = int(ids.min()) if ids.size else 0
    c = int(ids.max()) - lowest + 1 if ids.size else 1
    shifted = {m: [y - lowest for y in pair] for m, pair in labels.items()}
    return shifted, False, [str(lowest + i) for i in range(c)]


def load_multiview_mat(
    path: str | os.PathLike,
    *,
    views_key: str | None = None,
    labels_key: str | None = None,
    modality_names: Sequence[str] | None = None,
    samples_as_rows: bool | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> Dataset:
    """Load a multi-view-clustering .mat file: a cell array of V views and one label vector.

    Args:
        views_key: key of the 1 x V (or V x 1) cell array; default the first of "fea", "X".
        labels_key: key of the label vector; default the first of "gt", "Y".
        modality_names: V names; default "view1".."viewV" (MATLAB's fea{1}..fea{V}).
        samples_as_rows: orientation of every view. None detects it per view by matching the
            label count n against the view's rows/columns, and raises if both or neither match.
        fractions, seed: the seeded stratified split, applied to all views alike (rows are paired).

    Returns:
        Dataset named after the file stem; views densified to float32; class k is the k-th
        smallest label value of the file, named by that value.
    """
    with ArrayFile(path, "mat") as f, naming_file(f.path):
        views_key = views_key or f.first_present(MULTIVIEW_VIEW_KEYS, "views")
        labels_key = labels_key or f.first_present(MULTIVIEW_LABEL_KEYS, "labels")
        cells = f[views_key]
        if not (isinstance(cells, np.ndarray) and cells.dtype == object):
            raise ValueError(f"key {views_key!r} must be a cell array of views")
        cells = list(cells.reshape(-1))
        values, y = np.unique(class_ids(f[labels_key], f"key {labels_key!r}"), return_inverse=True)
        names = (
            [f"view{i + 1}" for i in range(len(cells))] if modality_names is None else list(modality_names)
        )
        if len(names) != len(cells):
            raise ValueError(f"{len(names)} modality_names given for {len(cells)} views")
        views = {}
        for i, (name, cell) in enumerate(zip(names, cells)):
            where = f"{views_key}{{{i + 1}}}"  # MATLAB's fea{1}, fea{2}, ...
            views[name] = _orient(dense(cell, where), y.size, where, samples_as_rows)
        stem = os.path.splitext(os.path.basename(f.path))[0]
        return split_paired_views(
            stem,
            views,
            y,
            [str(v) for v in values],
            fractions=fractions,
            seed=seed,
            source=f"multi-view .mat file {f.path}",
        )


def _authors_labels(value, key: str) -> np.ndarray:
    """(n, c) multi-hot rows as stored, or (n,) int64 ids from an (n,) / (n, 1) vector."""
    y = np.asarray(value)
    if y.ndim == 2 and y.shape[1] > 1:
        return y
    return class_ids(y, f"labels key {key!r}")


def _rows(f: ArrayFile, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, D) and 1-based ids (n,) for one key pair, with matching row counts."""
    x = dense(f[x_key], f"key {x_key!r}")
    y = class_ids(f[y_key], f"key {y_key!r}")
    if x.ndim != 2 or x.shape[0] != y.size:
        raise ValueError(
            f"features key {x_key!r} has shape {x.shape} but labels key {y_key!r} has "
            f"{y.size} entries (expected samples as rows)"
        )
    return x, y


def _orient(x: np.ndarray, n: int, where: str, samples_as_rows: bool | None) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"view {where} must be a matrix, got shape {x.shape}")
    if samples_as_rows is None:
        rows, cols = x.shape[0] == n, x.shape[1] == n
        if rows == cols:
            raise ValueError(
                f"view {where} has shape {x.shape} and there are {n} labels: cannot tell which "
                "axis holds the samples; pass samples_as_rows=True or False"
            )
        samples_as_rows = rows
    x = x if samples_as_rows else x.T
    if x.shape[0] != n:
        raise ValueError(f"view {where} has {x.shape[0]} samples but there are {n} labels")
    return x
