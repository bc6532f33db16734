"""Core in-memory types for multimodal retrieval data: Split, Modality, Dataset.

Shapes and dtypes (n = samples in a split, D = feature width of the modality, c = classes):

- features: float32, (n, D), C-contiguous, all finite.
- labels, single-label sets: int64, (n,), class ids in [0, c); -1 marks an unlabelled sample.
- labels, multi-label sets: uint8 or float32, (n, c), entries 0/1; an all-zero row marks an
  unlabelled sample.

SDML treats modalities as unpaired, so sample counts may differ between modalities and between
splits. Every object validates itself on construction and raises ValueError with a message that
names the modality, split and argument at fault.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..wording import plural

SPLIT_NAMES = ("train", "val", "test")


class Split:
    """Features and labels of one split of one modality.

    Args:
        features: (n, D) array-like of reals; stored as C-contiguous float32.
        labels: (n,) integer class ids (-1 = unlabelled; integral floats are accepted) or
            (n, c) multi-hot 0/1 rows (bool/integers -> uint8, floats -> float32).
        where: context for error messages, e.g. "modality 'image', split 'train'".
    """

    __slots__ = ("features", "labels")

    def __init__(self, features, labels, *, where: str = "split"):
        self.features = _as_features(features, where)
        self.labels = _as_labels(labels, where)
        if self.labels.shape[0] != self.features.shape[0]:
            raise ValueError(
                f"{where}: features has {self.features.shape[0]} rows but labels has "
                f"{self.labels.shape[0]} rows"
            )

    @classmethod
    def empty(cls, dim: int, num_classes: int | None = None) -> Split:
        """An empty split of width `dim`: (0,) labels, or (0, num_classes) multi-hot if given."""
        if num_classes is None:
            labels = np.zeros(0, np.int64)
        else:
            labels = np.zeros((0, num_classes), np.uint8)
        return cls(np.zeros((0, dim), np.float32), labels)

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def labelled(self) -> np.ndarray:
        """(n,) bool mask of samples that carry at least one label."""
        if self.multilabel:
            return self.labels.any(axis=1)
        return self.labels >= 0

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Split(n={self.n}, dim={self.dim}, labels={self.labels.dtype}{self.labels.shape})"


class Modality:
    """One modality: a name and its train/val/test splits (val and test may be empty).

    Each split may be given as a Split or as a (features, labels) pair; pairs are converted with
    error messages that name this modality and the split.
    """

    __slots__ = ("name", "train", "val", "test")

    def __init__(self, name: str, train, val, test):
        if not isinstance(name, str) or not name:
            raise ValueError(f"modality name must be a non-empty string, got {name!r}")
        self.name = name
        splits = {}
        for split_name, split in zip(SPLIT_NAMES, (train, val, test)):
            where = f"modality {name!r}, split {split_name!r}"
            if not isinstance(split, Split):
                try:
                    features, labels = split
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{where}: expected a Split or a (features, labels) pair, "
                        f"got {type(split).__name__}"
                    ) from None
                split = Split(features, labels, where=where)
            splits[split_name] = split
        self.train, self.val, self.test = splits["train"], splits["val"], splits["test"]
        if self.train.n == 0:
            raise ValueError(f"modality {name!r}, split 'train': the train split is empty")
        for split_name, split in self.splits():
            where = f"modality {name!r}, split {split_name!r}"
            if split.dim != self.train.dim:
                raise ValueError(
                    f"{where}: features have {split.dim} columns but the train split has "
                    f"{self.train.dim}"
                )
            if split.multilabel != self.train.multilabel:
                raise ValueError(
                    f"{where}: labels are {_kind(split)} but the train split's are "
                    f"{_kind(self.train)}"
                )

    @property
    def dim(self) -> int:
        return self.train.dim

    def splits(self) -> Iterator[tuple[str, Split]]:
        """(name, Split) pairs in the order train, val, test."""
        return iter(zip(SPLIT_NAMES, (self.train, self.val, self.test)))

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def __repr__(self) -> str:
        return (
            f"Modality({self.name!r}, dim={self.dim}, train={self.train.n}, "
            f"val={self.val.n}, test={self.test.n})"
        )


class Dataset:
    """A named set of modalities sharing one label space of c classes.

    Args:
        name: dataset name, e.g. "mfeat".
        modalities: at least one Modality, with unique names.
        class_names: c class names; c = len(class_names) is the number of classes.
        multilabel: whether labels are multi-hot rows; inferred from the first modality if None.
        source: provenance / attribution text shown by describe().
    """

    def __init__(
        self,
        name: str,
        modalities: Sequence[Modality],
        class_names: Sequence[str],
        *,
        multilabel: bool | None = None,
        source: str = "",
    ):
        self.name = str(name)
        self.modalities = list(modalities)
        self.class_names = [str(c) for c in class_names]
        self.source = str(source)
        if not self.modalities:
            raise ValueError(f"dataset {self.name!r}: needs at least one modality")
        for m in self.modalities:
            if not isinstance(m, Modality):
                raise ValueError(
                    f"dataset {self.name!r}: modalities must be Modality objects, "
                    f"got {type(m).__name__}"
                )
        names = [m.name for m in self.modalities]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset {self.name!r}: duplicate modality names {duplicates}")
        if not self.class_names:
            raise ValueError(f"dataset {self.name!r}: class_names is empty")
        if multilabel is None:
            multilabel = self.modalities[0].train.multilabel
        self.multilabel = bool(multilabel)
        for m in self.modalities:
            for split_name, split in m.splits():
                self._check_labels(split, f"modality {m.name!r}, split {split_name!r}")

    def _check_labels(self, split: Split, where: str) -> None:
        c = self.num_classes
        if split.multilabel != self.multilabel:
            expected = "multi-hot (n, c)" if self.multilabel else "class ids (n,)"
            raise ValueError(f"{where}: labels are {_kind(split)} but the dataset expects {expected}")
        if split.multilabel:
            if split.labels.shape[1] != c:
                raise ValueError(
                    f"{where}: multi-hot labels have {split.labels.shape[1]} columns but the "
                    f"dataset has {c} classes"
                )
        elif split.n and split.labels.max() >= c:
            bad = int(np.argmax(split.labels >= c))
            raise ValueError(
                f"{where}: labels has class id {int(split.labels[bad])} at row {bad}, "
                f"outside [-1, {c}) for {c} classes"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality(self, name: str) -> Modality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise ValueError(
            f"dataset {self.name!r} has no modality {name!r}; present: {', '.join(self.modality_names)}"
        )

    def __getitem__(self, name: str) -> Modality:
        return self.modality(name)

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, tuple(self.class_names), self.multilabel,
                           {m.name: (m.train.n, m.dim) for m in self.modalities})

    def __len__(self) -> int:
        return len(self.modalities)

    def __iter__(self) -> Iterator[Modality]:
        return iter(self.modalities)

    def describe(self) -> str:
        """Multi-line human-readable summary: classes, modalities, dims and split sizes."""
        kind = "multi-label" if self.multilabel else "single-label"
        lines = [
            f"dataset {self.name!r}: {plural(len(self.modalities), 'modality', 'modalities')}, {plural(self.num_classes, 'class', 'classes')} "
            f"({kind})"
        ]
        width = max(len(m.name) for m in self.modalities)
        for m in self.modalities:
            unlabelled = int((~m.train.labelled).sum())
            extra = f", {unlabelled} unlabelled in train" if unlabelled else ""
            lines.append(
                f"  {m.name:<{width}}  dim {m.dim:>6}  train {m.train.n:>7}  val {m.val.n:>6}  "
                f"test {m.test.n:>6}{extra}"
            )
        shown = ", ".join(self.class_names[:12]) + (", ..." if self.num_classes > 12 else "")
        lines.append(f"  classes: {shown}")
        if self.source:
            lines.append(f"  source: {self.source}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, modalities={self.modality_names}, "
            f"num_classes={self.num_classes}, multilabel={self.multilabel})"
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds, without its arrays: enough to plan a run (which modality trains
    where) before any features are read.

    shapes: modality name -> (train rows, feature width D), in the dataset's modality order.
    """

    name: str
    class_names: tuple[str, ...]
    multilabel: bool
    shapes: dict[str, tuple[int, int]]

    @property
    def modality_names(self) -> list[str]:
        return list(self.shapes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def default_class_names(num_classes: int) -> list[str]:
    """Class names "0" .. "c-1" for sets that ship no names."""
    return [str(i) for i in range(num_classes)]


def _kind(split: Split) -> str:
    return "multi-hot (n, c)" if split.multilabel else "class ids (n,)"


def _as_features(features, where: str) -> np.ndarray:
    try:
        x = np.asarray(features)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: features is not a numeric array ({exc})") from None
    if x.ndim != 2:
        raise ValueError(f"{where}: features must be 2-D (n, D), got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{where}: features has 0 columns")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{where}: features has non-numeric dtype {x.dtype}")
    if np.iscomplexobj(x):
        raise ValueError(f"{where}: features is complex ({x.dtype})")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"{where}: features contains NaN/Inf (or values too large for float32), "
            f"first at row {row}, column {col}"
        )
    return x


def _as_labels(labels, where: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim not in (1, 2):
        raise ValueError(f"{where}: labels must be (n,) class ids or (n, c) multi-hot, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise ValueError(f"{where}: labels has non-numeric dtype {y.dtype}")
    if y.ndim == 2:
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError(f"{where}: multi-hot labels must contain only 0 and 1")
        dtype = np.float32 if np.issubdtype(y.dtype, np.floating) else np.uint8
        return np.ascontiguousarray(y, dtype=dtype)
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ValueError(f"{where}: labels must be integer class ids, got non-integral values")
    y = np.ascontiguousarray(y, dtype=np.int64)
    if y.size and y.min() < -1:
        bad = int(np.argmax(y < -1))
        raise ValueError(
            f"{where}: labels has class id {int(y[bad])} at row {bad}; ids must be >= -1 "
            "(-1 = unlabelled)"
        )
    return y
