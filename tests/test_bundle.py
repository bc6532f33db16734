"""Bundles: what the manifest records, loading without pickle, atomic and non-destructive writes."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

import sdml_ext
from sdml_ext import bundle as bundle_mod
from sdml_ext.bundle import BundleError, add_to_bundle, save_bundle, set_metrics
from sdml_ext.data import make_synthetic
from sdml_ext.model import DSAE, make_projection, tensor_checksum
from sdml_ext.preprocess import Preprocessor
from sdml_ext.strategies import train_tasks
from sdml_ext.training import TrainOptions, make_tasks

OPTS = TrainOptions(hidden=(32, 32), code_dim=16, batch_size=50, epochs=2, seed=7)


@pytest.fixture(scope="module")
def trained():
    ds = make_synthetic(3, n_train=100, n_val=20, n_test=30, n_classes=4, seed=3)
    P = make_projection(16, 4, OPTS.seed)
    splits = [(m.train.features, m.train.labels, m.val.features, m.val.labels) for m in ds]
    report = train_tasks(make_tasks(ds.modality_names, splits, P, OPTS), "serial")
    return ds, P, report


def write(path, trained, n=None):
    ds, P, report = trained
    return save_bundle(
        path, P=P, projection_seed=OPTS.seed, results=report.modalities[:n], class_names=ds.class_names,
        dataset={"name": ds.name}, config={"epochs": 2}, run=report.summary(), metrics={"test": {"avg": 0.5}},
    )


def test_manifest_and_files(tmp_path, trained):
    ds, P, report = trained
    path = write(tmp_path / "b", trained)
    assert sorted(os.listdir(path)) == ["manifest.json", "modality-00.safetensors", "modality-01.safetensors",
                                        "modality-02.safetensors", "projection.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["projection"] == {"file": "projection.safetensors", "seed": 7, "shape": [16, 4],
                                      "sha256": tensor_checksum(P)}
    assert [m["name"] for m in manifest["modalities"]] == ["m0", "m1", "m2"]
    assert [m["input_dim"] for m in manifest["modalities"]] == [64, 48, 32]
    assert manifest["class_names"] == ["0", "1", "2", "3"] and manifest["config"] == {"epochs": 2}
    assert {"sdml_ext", "torch", "safetensors"} <= set(manifest["versions"])
    assert manifest["metrics"] == {"test": {"avg": 0.5}}
    assert len(manifest["modalities"][0]["training"]["history"]) == 2
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert all(os.stat(path / f).st_mode & 0o777 == 0o666 & ~umask for f in os.listdir(path))


def test_encode_matches_the_trained_network_and_never_unpickles(tmp_path, trained, monkeypatch):
    ds, _, report = trained
    path = write(tmp_path / "b", trained)

    def forbidden(*args, **kwargs):
        raise AssertionError("bundle loading must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    b = sdml_ext.load(path)
    x = ds["m1"].test.features
    codes = b.encode("m1", x)
    result = report.modalities[1]
    model = DSAE(**result.model_options)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in result.state.items() if not k.startswith("preprocess.")})
    pre = Preprocessor("standardize", torch.from_numpy(result.state["preprocess.shift"]),
                       torch.from_numpy(result.state["preprocess.scale"]))
    with torch.no_grad():
        expected = model.encode(pre(torch.from_numpy(x)))
    assert codes.shape == (30, 16) and codes.dtype == torch.float32
    torch.testing.assert_close(codes, expected)
    torch.testing.assert_close(b.encode("m1", torch.from_numpy(x).double()), expected)  # any real dtype
    assert b.modality_names == ["m0", "m1", "m2"] and b.projection_seed == 7


def test_encode_rejects_bad_input(tmp_path, trained):
    b = sdml_ext.load(write(tmp_path / "b", trained))
    with pytest.raises(ValueError, match=r"expects features of shape \[n, 48\], got \(5, 47\)"):
        b.encode("m1", np.zeros((5, 47), np.float32))
    with pytest.raises(ValueError, match="no modality 'text'"):
        b.encode("text", np.zeros((5, 48), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        b.encode("m1", np.full((2, 48), np.nan, np.float32))


def test_never_overwrites_and_leaves_nothing_on_failure(tmp_path, trained, monkeypatch):
    path = write(tmp_path / "b", trained)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}
    with pytest.raises(BundleError, match="already exists"):
        write(path, trained)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before

    calls = []
    real = bundle_mod._write_modality

    def fail_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(bundle_mod, "_write_modality", fail_on_second)
    with pytest.raises(OSError):
        write(tmp_path / "c", trained)
    assert sorted(os.listdir(tmp_path)) == ["b"]  # no bundle, no temporary directory


def test_corrupt_or_missing_bundles_are_clear_errors(tmp_path, trained):
    path = write(tmp_path / "b", trained)
    with pytest.raises(BundleError, match="not found"):
        sdml_ext.load(tmp_path / "absent")
    with pytest.raises(BundleError, match="not an SDML bundle"):
        sdml_ext.load(tmp_path)
    data = bytearray((path / "modality-01.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "modality-01.safetensors").write_bytes(bytes(data))
    b = sdml_ext.load(path)
    b.encode("m0", np.zeros((1, 64), np.float32))  # other modalities still load
    with pytest.raises(BundleError, match="checksum"):
        b.encode("m1", np.zeros((1, 48), np.float32))
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        sdml_ext.load(path)


def test_add_leaves_existing_files_bit_identical(tmp_path, trained):
    _, _, report = trained
    path = write(tmp_path / "b", trained, n=2)
    before = {f: (path / f).read_bytes() for f in os.listdir(path) if f != "manifest.json"}
    add_to_bundle(path, [report.modalities[2]], run={"kind": "add"}, metrics={"extra": 1})
    assert {f: (path / f).read_bytes() for f in before} == before
    b = sdml_ext.load(path)
    assert b.modality_names == ["m0", "m1", "m2"]
    manifest = b.manifest
    assert [r.get("kind") for r in manifest["runs"]] == [None, "add"] and manifest["metrics"]["extra"] == 1
    with pytest.raises(BundleError, match="already has a modality named 'm2'"):
        add_to_bundle(path, [report.modalities[2]], run={})
    set_metrics(path, {"test": {"avg": 0.9}})
    assert sdml_ext.load(path).manifest["metrics"]["test"] == {"avg": 0.9}
    # No temporary files left; the writers' lock file stays (removing it would race a new writer).
    assert [f for f in os.listdir(path) if f.startswith(".")] == [".lock"]
