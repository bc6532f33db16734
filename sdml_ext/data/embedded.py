"""The default dataset, shipped inside the package: UCI "Multiple Features" handwritten digits.

2,000 digits, 200 per class "0".."9", each described by six views that serve as six modalities:

    fou  76-d Fourier coefficients     pix  240-d pixel averages (2 x 3 windows)
    fac 216-d profile correlations     zer   47-d Zernike moments
    kar  64-d Karhunen-Loeve coeffs    mor    6-d morphological features

Source: van Breukelen, Duin, Tax, den Hartog (1998), "Handwritten digit recognition by combined
classifiers", Kybernetika 34(4); UCI Machine Learning Repository "Multiple Features", CC BY 4.0
(see MFEAT_LICENSE.txt next to this module; mfeat.npz is built by tools/make_mfeat.py).

The file holds no split. load_mfeat draws one with stratified_split: by default 60/20/20 within
each digit (1,200 / 400 / 400 samples) with seed 0. The same sample indices are used for every
view; the rows are paired, which is harmless because SDML treats modalities as unpaired.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import numpy as np

from .dataset import Dataset, default_class_names
from .splits import DEFAULT_FRACTIONS, split_paired_views

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
MFEAT_SOURCE = (
    'UCI Machine Learning Repository "Multiple Features" (van Breukelen, Duin, Tax, den Hartog '
    '1998, "Handwritten digit recognition by combined classifiers"), CC BY 4.0'
)


def load_mfeat(
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    views: Sequence[str] | None = None,
) -> Dataset:
    """Load the embedded UCI digits as a 10-class single-label Dataset.

    Args:
        seed: seed of the stratified split.
        fractions: (train, val, test) fractions within each digit.
        views: modality names to keep, in this order (default: all six, in MFEAT_VIEWS order).

    Returns:
        Dataset "mfeat" with float32 features and int64 labels 0..9, class names "0".."9".
    """
    views = tuple(MFEAT_VIEWS if views is None else views)
    unknown = [v for v in views if v not in MFEAT_VIEWS]
    if unknown or not views or len(set(views)) != len(views):
        raise ValueError(
            f"views must be distinct names from {', '.join(MFEAT_VIEWS)}; got {list(views)}"
        )
    with resources.files(__package__).joinpath("mfeat.npz").open("rb") as f:
        with np.load(f) as data:
            features = {v: data[v].astype(np.float32) for v in views}
            labels = data["labels"].astype(np.int64)
    return split_paired_views(
        "mfeat",
        features,
        labels,
        default_class_names(10),
        fractions=fractions,
        seed=seed,
        source=MFEAT_SOURCE,
    )
