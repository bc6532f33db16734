"""One modality-order rule for every container: the `modalities` key's order when the file has
one, else alphabetical. The same arrays in a .npz, .mat, .h5 or a folder of .npy files give the
same modality order, hence the same seeds, learning rates and models; --modalities' order is
the run's order in every container."""

import json

import h5py
import numpy as np
import pytest
import scipy.io
from safetensors.numpy import load_file

from sdml_ext import cli, train
from sdml_ext.data import load_dataset, make_synthetic
from sdml_ext.data.generic import to_arrays
from sdml_ext.data.dataset import Dataset, Modality
from helpers import run_config

NAMES = ["img", "txt", "aud"]  # file order, not alphabetical
CONFIG = run_config(strategy="serial", epochs=2, hidden=[32, 32], code_dim=16, lr=[1e-3, 2e-3], batch_size=50)


def write_containers(tmp_path) -> dict:
    ds = make_synthetic(3, dims=[12, 9, 7], n_train=100, n_val=30, n_test=40, n_classes=4, seed=5)
    renamed = Dataset("same", [Modality(n, m.train, m.val, m.test) for n, m in zip(NAMES, ds.modalities)],
                      ds.class_names)
    arrays = {k: v for k, v in to_arrays(renamed).items() if k != "modalities"}  # no order key: the rule decides
    paths = {"npz": tmp_path / "same.npz", "mat": tmp_path / "same.mat", "h5": tmp_path / "same.h5",
             "dir": tmp_path / "same"}
    np.savez(paths["npz"], **arrays)
    scipy.io.savemat(paths["mat"], arrays)
    with h5py.File(paths["h5"], "w") as f:
        for key, value in arrays.items():
            f[key] = value.astype("S") if value.dtype.kind == "U" else value  # h5py stores bytes
    paths["dir"].mkdir()
    for key, value in arrays.items():
        np.save(paths["dir"] / f"{key}.npy", value)
    with_key = tmp_path / "ordered.npz"
    np.savez(with_key, **arrays, modalities=np.array(NAMES))
    return paths, with_key


def trained(path, out, capsys, *flags):
    code = cli.run(train.main, ["--data", str(path), "--config", str(out.parent / "cfg.toml"), "--out", str(out), *flags])
    _, err = capsys.readouterr()
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    return [(m["name"], m["training"]["lr"], load_file(str(out / m["file"]))) for m in manifest["modalities"]]


def same_models(a, b) -> bool:
    return [(n, lr) for n, lr, _ in a] == [(n, lr) for n, lr, _ in b] and all(
        ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta) for (_, _, ta), (_, _, tb) in zip(a, b))


def test_every_container_orders_modalities_alike_and_gives_the_same_models(tmp_path, capsys):
    paths, with_key = write_containers(tmp_path)
    (tmp_path / "cfg.toml").write_text(CONFIG)
    for fmt, path in paths.items():
        assert load_dataset(None, path).modality_names == sorted(NAMES), fmt
    assert load_dataset(None, with_key).modality_names == NAMES  # an explicit order key wins
    runs = {fmt: trained(path, tmp_path / f"run-{fmt}", capsys) for fmt, path in paths.items()}
    assert [n for n, _, _ in runs["npz"]] == sorted(NAMES) and [lr for _, lr, _ in runs["npz"]] == [1e-3, 2e-3, 2e-3]
    for fmt in ("mat", "h5", "dir"):
        assert same_models(runs["npz"], runs[fmt]), fmt
    # --modalities: its order is the run's (indices, seeds, learning rates), in every container.
    chosen = {fmt: trained(path, tmp_path / f"chosen-{fmt}", capsys, "--modalities", "txt,img")
              for fmt, path in paths.items()}
    assert [(n, lr) for n, lr, _ in chosen["npz"]] == [("txt", 1e-3), ("img", 2e-3)]
    for fmt in ("mat", "h5", "dir"):
        assert same_models(chosen["npz"], chosen[fmt]), fmt
    assert not same_models(chosen["npz"], runs["npz"][:2])  # the order matters, so the test can tell
