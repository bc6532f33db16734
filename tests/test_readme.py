"""The README's Python snippets run as written (a doctest for Markdown)."""

import re
from pathlib import Path

import numpy as np

from sdml_ext import cli

from sdml_ext import train
from helpers import run_config

README = Path(__file__).resolve().parents[1] / "README.md"

SMALL = run_config(strategy="serial", epochs=5, hidden=[64], code_dim=16, lr=[1e-3])


def _snippet(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    matching = [b for b in blocks if marker in b]
    assert len(matching) == 1, f"expected one README python block containing {marker!r}"
    return matching[0]


def test_encode_features_of_the_embedded_dataset(tmp_path, monkeypatch):
    settings = tmp_path / "small.toml"
    settings.write_text(SMALL)
    monkeypatch.chdir(tmp_path)  # the snippet's relative bundle path, as after the README's train command
    assert cli.run(train.main, ["--modalities", "fou,kar", "--config", str(settings), "--out", "runs/digits"]) == 0
    namespace: dict = {}
    exec(compile(_snippet("precision_at_10 = "), "README.md", "exec"), namespace)
    assert namespace["query"].shape == (400, 16) and namespace["gallery"].shape == (400, 16)
    assert namespace["index"].shape == (400, 10)
    # Ten balanced classes: chance is 0.1; even this small model retrieves far better.
    assert 0.3 < float(namespace["precision_at_10"]) <= 1.0
    assert np.isfinite(namespace["scores"].numpy()).all()
