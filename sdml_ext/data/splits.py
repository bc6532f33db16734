"""Seeded, stratified train/val/test splits of sample indices.

Used for sets that ship without a split (the embedded UCI digits, multi-view-clustering .mat
files). The split is a pure function of (labels, fractions, seed): numpy's PCG64 Generator with a
fixed seed, classes visited in ascending order, so the same call always returns the same indices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .dataset import Dataset, Modality

DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
"""Default train/val/test fractions, applied within each class."""


def stratified_split(
    labels: np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sample indices into train/val/test, class by class.

    Args:
        labels: (n,) integer class ids (-1 = unlabelled), or (n, c) multi-hot rows. Multi-hot rows
            are stratified on their first (lowest-index) label; all-zero rows form one stratum,
            as do -1 ids.
        fractions: (train, val, test) fractions, each >= 0, train > 0, summing to 1.
        seed: seed of the numpy Generator that shuffles each class.

    Returns:
        (train, val, test): int64 index arrays, each sorted ascending, disjoint, covering 0..n-1.
        Each class is divided by largest remainder (ties favour train, then val); a split with a
        positive fraction then gets at least one sample of the class when the class has a sample
        to spare (train first, then test, then val).
    """
    strata = _strata(np.asarray(labels))
    f = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        bounds = np.cumsum(_allocate(members.size, f))[:-1]
        for part, chunk in zip(parts, np.split(members, bounds)):
            part.append(chunk)
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)  # type: ignore[return-value]


def _strata(y: np.ndarray) -> np.ndarray:
    if y.ndim == 1:
        return y.astype(np.int64)
    if y.ndim == 2:
        positive = y > 0
        return np.where(positive.any(axis=1), positive.argmax(axis=1), -1)
    raise ValueError(f"labels must be (n,) class ids or (n, c) multi-hot, got shape {y.shape}")


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or not np.isfinite(f).all() or (f < 0).any() or f[0] <= 0:
        raise ValueError(
            f"fractions must be three numbers (train, val, test), >= 0 with train > 0; got {fractions!r}"
        )
    if abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {f.sum():g})")
    return f / f.sum()


def _allocate(n: int, f: np.ndarray) -> np.ndarray:
    exact = n * f
    # The epsilon keeps 0.6 * 200 = 120.00000000000001 and 0.29 * 100 = 28.999999999999996 exact.
    counts = np.floor(exact + 1e-9).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: max(n - counts.sum(), 0)]] += 1
    for j in (0, 2, 1):
        if f[j] > 0 and counts[j] == 0:
            donor = int(np.argmax(counts))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[j] += 1
    return counts


def split_paired_views(
    name: str,
    views: Mapping[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    source: str = "",
) -> Dataset:
    """Build a Dataset from views whose rows describe the same n samples.

    One stratified_split of `labels` is applied to every view, so row i of each view lands in
    the same split (SDML itself ignores the pairing).

    Args:
        views: modality name -> (n, D_i) features, in modality order.
        labels: (n,) class ids or (n, c) multi-hot rows shared by all views.
    """
    labels = np.asarray(labels)
    for view, x in views.items():
        if np.shape(x)[0] != labels.shape[0]:
            raise ValueError(
                f"modality {view!r}: features has {np.shape(x)[0]} rows but labels has "
                f"{labels.shape[0]} rows"
            )
    parts = stratified_split(labels, fractions, seed)
    modalities = [
        Modality(view, *((x[idx], labels[idx]) for idx in parts)) for view, x in views.items()
    ]
    return Dataset(name, modalities, class_names, source=source)
