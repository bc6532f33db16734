"""load_dataset: one entry point that maps a dataset name (or a file) to the right loader."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

from ._io import ArrayFile, check_path, format_of
from .dataset import Dataset, DatasetInfo
from .embedded import load_mfeat
from .formats import (
    AUTHORS_H5_KEYS,
    AUTHORS_H5_N_VAL,
    MULTIVIEW_VIEW_KEYS,
    XMEDIA_KEYS,
    describe_authors_h5,
    load_authors_h5,
    load_multiview_mat,
    load_xmedia,
    read_authors_h5,
)
from .generic import describe_generic, load_generic, read_generic
from .synthetic import make_synthetic

DATASET_NAMES = (
    "mfeat",
    "synthetic",
    "xmedia",
    "wikipedia",
    "nus-wide",
    "mscoco",
    "multiview-mat",
    "npz",
    "h5",
    "mat",
    "dir",
    "auto",
)
"""Names accepted by load_dataset ("auto" = detect from the file; also what None means)."""

BUILT_IN_DATASETS = ("mfeat", "synthetic")
"""Names whose data ship with (or are drawn by) the package: they take no path."""


def load_dataset(name: str | None = "mfeat", path: str | os.PathLike | None = None, **opts) -> Dataset:
    """Load a dataset by name.

    Args:
        name: one of DATASET_NAMES (case-insensitive):
            "mfeat"          the embedded UCI digits (no path); opts go to load_mfeat
            "synthetic"      make_synthetic(**opts) (no path)
            "xmedia"         authors' XMedia .mat; opts go to load_xmedia
            "wikipedia", "nus-wide", "mscoco"
                             authors' HDF5; opts go to load_authors_h5, with n_val defaulting
                             to 231 / 5,000 / 10,000
            "multiview-mat"  multi-view-clustering .mat; opts go to load_multiview_mat
            "npz", "h5", "mat", "dir"
                             the generic layout (sdml_ext.data.generic) in that format
            "auto" or None   detect from the file (detect_layout): generic-layout keys first,
                             then the XMedia, authors' HDF5 and multi-view keys
        path: the data file or directory (required for every name but mfeat and synthetic).
        **opts: keyword options of the chosen loader.

    Raises:
        ValueError: unknown name (the message lists the valid ones), unreadable file, bad data.
        FileNotFoundError: `path` does not exist.
        MissingKeyError (KeyError and ValueError): a required key is absent from the file.
    """
    key, path = _resolve(name, path, opts)
    if key in BUILT_IN_DATASETS:
        return load_mfeat(**opts) if key == "mfeat" else make_synthetic(**opts)
    if key == "xmedia":
        return load_xmedia(path, **opts)
    if key in AUTHORS_H5_N_VAL:
        return load_authors_h5(path, name=key, **opts)
    if key == "authors-h5":
        return load_authors_h5(path, **opts)
    if key == "multiview-mat":
        return load_multiview_mat(path, **opts)
    return load_generic(path, key, **opts)


READ_PER_MODALITY = ("npz", "h5", "dir", "wikipedia", "nus-wide", "mscoco", "authors-h5")
"""Layouts whose files load_modalities reads per modality (generic .mat files too when they are
MATLAB v7.3, i.e. HDF5). The others are read whole: v5 .mat files (scipy reads them whole), the
XMedia and multi-view .mat files, the embedded digits (tiny) and synthetic data (drawn)."""


def reads_per_modality(name: str | None, path: str | os.PathLike | None = None, **opts) -> bool:
    """Whether describe_dataset and load_modalities read this dataset's file per modality (else
    they load it whole, and a caller that needs it whole anyway loads it once)."""
    key, path = _resolve(name, path, opts)
    if key == "mat":
        import h5py

        return h5py.is_hdf5(path)  # MATLAB v7.3
    return key in READ_PER_MODALITY


def describe_dataset(name: str | None = "mfeat", path: str | os.PathLike | None = None, **opts) -> DatasetInfo:
    """What load_dataset(name, path, **opts) would hold (modalities, their train rows and widths,
    classes) without reading features where the layout allows (READ_PER_MODALITY): from the
    arrays' headers. Other layouts are loaded whole."""
    key, path = _resolve(name, path, opts)
    if key in ("npz", "h5", "dir", "mat"):
        return describe_generic(path, key)
    if key in AUTHORS_H5_N_VAL or key == "authors-h5":
        opts.pop("n_val", None)
        return describe_authors_h5(path, **{"name": key, **opts})  # "authors-h5" may be named
    return load_dataset(key, path, **opts).info()


def load_modalities(name: str | None, path: str | os.PathLike | None, names: Sequence[str], **opts) -> Dataset:
    """load_dataset(name, path, **opts) keeping only the modalities `names`, in that order, with
    the whole dataset's classes. Layouts in READ_PER_MODALITY read only those modalities'
    features (and labels; see read_generic and read_authors_h5 for the label vectors read to
    count classes); the others are loaded whole and the rest dropped."""
    key, path = _resolve(name, path, opts)
    if key in ("npz", "h5", "dir", "mat"):
        return read_generic(path, key, only=names)
    if key in AUTHORS_H5_N_VAL or key == "authors-h5":
        return read_authors_h5(path, only=names, **{"name": key, **opts})
    whole = load_dataset(key, path, **opts)
    return Dataset(whole.name, [whole.modality(n) for n in names], whole.class_names,
                   multilabel=whole.multilabel, source=whole.source)


def _resolve(name: str | None, path, opts: dict) -> tuple[str, str | None]:
    """(the loader's key, the checked path); fills in the options load_dataset defaults (n_val
    of the authors' files) and checks the rest."""
    key = "auto" if name is None else str(name).lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if key in BUILT_IN_DATASETS:
        if path is not None:
            raise ValueError(f"dataset {key!r} is built in and takes no path (got {path!r})")
        _check_options(key, opts)
        return key, None
    if path is None:
        raise ValueError(f"dataset {key!r} needs a path to its file")
    path = check_path(path)
    if key == "auto":
        key = detect_layout(path, opts.get("n_val"))
    _check_options(key, opts)
    if key in AUTHORS_H5_N_VAL:
        opts.setdefault("n_val", AUTHORS_H5_N_VAL[key])
    return key, path


# The loader behind each name, and the parameters load_dataset fills in itself.
_LOADERS = {
    "mfeat": (load_mfeat, ()),
    "synthetic": (make_synthetic, ()),
    "xmedia": (load_xmedia, ("path",)),
    "authors-h5": (load_authors_h5, ("path",)),
    **{name: (load_authors_h5, ("path", "name")) for name in AUTHORS_H5_N_VAL},
    "multiview-mat": (load_multiview_mat, ("path",)),
    **{fmt: (load_generic, ("path", "fmt")) for fmt in ("npz", "h5", "mat", "dir")},
}


def _check_options(key: str, opts: dict) -> None:
    """ValueError naming options the loader of `key` does not take (instead of a TypeError from
    deep inside the call); nothing to check for "auto" until the layout is detected."""
    if key not in _LOADERS:
        return
    loader, fixed = _LOADERS[key]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [n for n, p in inspect.signature(loader).parameters.items() if p.kind in kinds and n not in fixed]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(
            f"dataset {key!r}: unknown dataset option(s) {unknown}; "
            f"{'valid: ' + ', '.join(valid) if valid else 'it takes none'}"
        )


AUTHORS_H5_TEST_ROWS = {name: n_val + n_test for name, (n_val, n_test) in
                       {"wikipedia": (231, 462), "nus-wide": (5000, 23661), "mscoco": (10000, 30137)}.items()}
"""Rows of each authors' HDF5 file's official image test set (validation + test split)."""

_LAYOUTS = (
    "the generic layout ({m}_train_x keys, in .npz/.h5/.mat or a folder of .npy files), "
    "the authors' XMedia .mat (I_tr_CNN, ...), the authors' Wikipedia / NUS-WIDE / MS-COCO HDF5 "
    "(train_imgs_deep, ...) and multi-view-clustering .mat files (fea + gt)"
)


def detect_layout(path: str | os.PathLike, n_val: int | None = None) -> str:
    """The dataset name (one of DATASET_NAMES) whose loader reads the file at `path`.

    Decided from the format and the keys the file holds: generic-layout keys first, then the
    authors' XMedia .mat, the authors' HDF5 files, multi-view .mat files. An authors' HDF5 file is
    told apart by the size of its image test set (AUTHORS_H5_TEST_ROWS); any other size needs
    `n_val` (then the result is "authors-h5") or an explicit name.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the layout cannot be told; the message lists the candidates.
    """
    path = check_path(path)
    fmt = format_of(path)
    if fmt in ("npz", "dir"):
        return fmt
    with ArrayFile(path, fmt) as f:
        keys = f.keys()
        if any(k.endswith("_train_x") for k in keys):
            return fmt
        if fmt == "mat" and any(v[0] in keys for v in XMEDIA_KEYS.values()):
            return "xmedia"
        if fmt == "mat" and any(k in keys for k in MULTIVIEW_VIEW_KEYS):
            return "multiview-mat"
        if fmt == "h5" and AUTHORS_H5_KEYS["image"][0] in keys:
            test_key = AUTHORS_H5_KEYS["image"][2]
            rows = f.shape(test_key)[0] if test_key in keys else 0
            if n_val is not None:
                return "authors-h5"
            for name, expected in AUTHORS_H5_TEST_ROWS.items():
                if rows == expected:
                    return name
            raise ValueError(
                f"{path} is in the SDML authors' HDF5 layout but its {rows} test images match none of "
                + ", ".join(f"{n} ({r})" for n, r in AUTHORS_H5_TEST_ROWS.items())
                + ": pass --dataset wikipedia, nus-wide or mscoco, or the option n_val=<validation rows>"
            )
    raise ValueError(
        f"{path}: cannot tell the dataset layout from its keys ({', '.join(keys[:12]) or 'none'}"
        f"{', ...' if len(keys) > 12 else ''}); readable layouts: {_LAYOUTS}; "
        f"or name one with --dataset: {', '.join(DATASET_NAMES)}"
    )
