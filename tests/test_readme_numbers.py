"""The README's default-run figures are the ones benchmarks/default_run.py last regenerated
(benchmarks/default_run.json, with its date and machine), and the code still runs the recipe that
produced them.

The full default run (6 views x 40 epochs) takes 50-120 s on 2 idle cores and several minutes on
a loaded one, too much for every CI run; its fingerprint (the same recipe on 2 views for 2
epochs: per-epoch losses and mAP, a few seconds) moves with anything that moves the README's
figures short of the epoch count: data, preprocessing, seeds, initialisation, optimiser, loss,
evaluation. When it fails, rerun benchmarks/default_run.py and update the README's figures."""

import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import default_run  # noqa: E402

RECORD = json.loads(default_run.RESULT.read_text())


def test_the_readme_quotes_the_regenerated_figures():
    text = " ".join(ROOT.joinpath("README.md").read_text(encoding="utf-8").split())
    found = re.search(r"mAP@all averaged over the 30 ordered pairs (\d\.\d{3})\*\* \(mAP@50 (\d\.\d{3})", text)
    assert found, "the README's default-run sentence has changed: update this test with it"
    assert (float(found.group(1)), float(found.group(2))) == (round(RECORD["map_all"], 3), round(RECORD["map_at_50"], 3))
    day = RECORD["date"].split()[0]
    assert f"`benchmarks/default_run.py`" in text and day in text and RECORD["machine"] in text


def test_the_recipe_still_gives_the_recorded_fingerprint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now, then = default_run.fingerprint(), RECORD["fingerprint"]
    assert now["flags"] == then["flags"] and now["train_loss"].keys() == then["train_loss"].keys()
    for name, losses in then["train_loss"].items():
        # Another CPU sums the GEMMs in another order: last-bit differences, not another recipe.
        np.testing.assert_allclose(now["train_loss"][name], losses, rtol=1e-4, err_msg=name)
    assert abs(now["map_all"] - then["map_all"]) < 2e-3 and abs(now["map_at_50"] - then["map_at_50"]) < 2e-3
