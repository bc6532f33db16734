"""Class-structured synthetic multimodal data for tests, demos and benchmarks.

Generative model (L = latent_dim, c = n_classes):
- each class k has a latent centre mu_k ~ N(0, I_L), shared by all modalities;
- a sample with label set S has latent z = mean_{k in S} mu_k + noise * N(0, I_L);
- modality i maps z to its own width D_i with a fixed random map
  x = tanh(z W_i + b_i) + noise * N(0, I_{D_i})   (or z W_i + b_i + noise when nonlinear=False),
  W_i ~ N(0, 1/L), b_i ~ N(0, 0.1^2).
Samples of the same class therefore cluster in every modality through the shared centres, so a
model can learn to retrieve across modalities; nothing pairs rows between modalities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .dataset import Dataset, Modality, default_class_names


def make_synthetic(
    n_modalities: int = 3,
    dims: int | Sequence[int] | None = None,
    n_classes: int = 10,
    n_train: int | Sequence[int] = 300,
    n_val: int | Sequence[int] = 100,
    n_test: int | Sequence[int] = 100,
    *,
    multilabel: bool = False,
    max_labels: int = 3,
    unlabelled: float = 0.0,
    noise: float = 0.7,
    latent_dim: int = 32,
    nonlinear: bool = True,
    seed: int = 0,
) -> Dataset:
    """Draw a synthetic Dataset named "synthetic" with modalities "m0", "m1", ...

    Args:
        n_modalities: number of modalities m.
        dims: feature width per modality (one int for all, or m ints); default 64, 48, 32,
            64, ... for modalities 0, 1, 2, 3, ...
        n_classes: number of classes c.
        n_train, n_val, n_test: samples per split, one int for all modalities or m ints.
        multilabel: if True, labels are (n, c) uint8 multi-hot rows with 1..max_labels ones;
            otherwise (n,) int64 class ids, classes balanced within each split.
        max_labels: most labels per sample when multilabel.
        unlabelled: fraction of each modality's train rows whose labels are hidden
            (-1 / all-zero row); their features still come from their true classes.
        noise: std of the within-class latent jitter and of the additive feature noise.
        latent_dim: width L of the shared latent space.
        nonlinear: apply tanh after the linear map.
        seed: the result is a pure function of the arguments; each modality draws from its own
            stream, so changing one modality's sizes leaves the others unchanged.

    Returns:
        Dataset with float32 features; val/test rows are always labelled.
    """
    m = int(n_modalities)
    if m < 1:
        raise ValueError(f"n_modalities must be >= 1, got {n_modalities}")
    if dims is None:
        dims = [(64, 48, 32)[i % 3] for i in range(m)]
    dims_ = _per_modality("dims", dims, m)
    sizes = {
        name: _per_modality(name, value, m)
        for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test))
    }
    if min(dims_) < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    if min(sizes["n_train"]) < 1 or min(sizes["n_val"]) < 0 or min(sizes["n_test"]) < 0:
        raise ValueError("n_train must be >= 1 and n_val, n_test >= 0 for every modality")
    if n_classes < 1 or latent_dim < 1:
        raise ValueError(f"n_classes and latent_dim must be >= 1, got {n_classes}, {latent_dim}")
    if multilabel and not 1 <= max_labels <= n_classes:
        raise ValueError(f"max_labels must be in [1, n_classes={n_classes}], got {max_labels}")
    if not 0.0 <= unlabelled < 1.0:
        raise ValueError(f"unlabelled must be in [0, 1), got {unlabelled}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(m + 1)]
    centres = streams[0].standard_normal((n_classes, latent_dim))
    modalities = []
    for i in range(m):
        rng = streams[i + 1]
        weight = rng.standard_normal((latent_dim, dims_[i])) / np.sqrt(latent_dim)
        bias = 0.1 * rng.standard_normal(dims_[i])
        splits = []
        for split in ("n_train", "n_val", "n_test"):
            n = sizes[split][i]
            membership = _draw_labels(rng, n, n_classes, multilabel, max_labels)
            z = membership @ centres / np.maximum(membership.sum(1, keepdims=True), 1)
            z += noise * rng.standard_normal((n, latent_dim))
            x = z @ weight + bias
            if nonlinear:
                x = np.tanh(x)
            x += noise * rng.standard_normal(x.shape)
            labels = membership.astype(np.uint8) if multilabel else membership.argmax(1)
            if split == "n_train" and unlabelled > 0:
                hidden = rng.choice(n, size=int(round(unlabelled * n)), replace=False)
                labels[hidden] = 0 if multilabel else -1
            splits.append((x.astype(np.float32), labels))
        modalities.append(Modality(f"m{i}", *splits))
    kind = "multi-label" if multilabel else "single-label"
    return Dataset(
        "synthetic",
        modalities,
        default_class_names(n_classes),
        multilabel=multilabel,
        source=f"sdml_ext.data.make_synthetic(seed={seed}), {kind}, noise={noise}",
    )


def _per_modality(name: str, value, m: int) -> list[int]:
    if np.ndim(value) == 0:
        return [int(value)] * m
    values = [int(v) for v in value]
    if len(values) != m:
        raise ValueError(f"{name} must be one int or {m} ints (one per modality), got {list(value)}")
    return values


def _draw_labels(
    rng: np.random.Generator, n: int, c: int, multilabel: bool, max_labels: int
) -> np.ndarray:
    """(n, c) float64 0/1 membership: balanced one-hot rows, or 1..max_labels random ones."""
    out = np.zeros((n, c))
    if not multilabel:
        out[np.arange(n), rng.permutation(np.arange(n) % c)] = 1.0
        return out
    counts = rng.integers(1, max_labels + 1, size=n)
    for row, k in enumerate(counts):
        out[row, rng.choice(c, size=k, replace=False)] = 1.0
    return out
