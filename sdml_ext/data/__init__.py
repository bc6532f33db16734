"""Datasets for SDML: in-memory types, the embedded UCI digits, a synthetic generator and file
loaders. Pure Python (numpy; scipy/h5py only when a .mat/.h5 file is read); needs no compiled code.

    from sdml_ext.data import load_dataset
    ds = load_dataset("mfeat")          # 6 modalities, 10 classes, shipped with the package
    print(ds.describe())
    x, y = ds["fou"].train.features, ds["fou"].train.labels   # (n, 76) float32, (n,) int64
"""

from ..errors import MissingKeyError
from .dataset import Dataset, DatasetInfo, Modality, Split, default_class_names
from .embedded import MFEAT_VIEWS, load_mfeat
from .formats import AUTHORS_H5_N_VAL, load_authors_h5, load_multiview_mat, load_xmedia
from .generic import load_generic, save_npz, to_arrays
from .registry import (
    AUTHORS_H5_TEST_ROWS,
    BUILT_IN_DATASETS,
    DATASET_NAMES,
    READ_PER_MODALITY,
    describe_dataset,
    detect_layout,
    load_dataset,
    load_modalities,
    reads_per_modality,
)
from .splits import DEFAULT_FRACTIONS, split_paired_views, stratified_split
from .synthetic import make_synthetic

__all__ = [
    "AUTHORS_H5_N_VAL",
    "AUTHORS_H5_TEST_ROWS",
    "BUILT_IN_DATASETS",
    "DATASET_NAMES",
    "DEFAULT_FRACTIONS",
    "MFEAT_VIEWS",
    "Dataset",
    "DatasetInfo",
    "MissingKeyError",
    "Modality",
    "READ_PER_MODALITY",
    "Split",
    "default_class_names",
    "describe_dataset",
    "detect_layout",
    "load_authors_h5",
    "load_dataset",
    "load_generic",
    "load_modalities",
    "load_mfeat",
    "load_multiview_mat",
    "load_xmedia",
    "make_synthetic",
    "reads_per_modality",
    "save_npz",
    "split_paired_views",
    "stratified_split",
    "to_arrays",
]
