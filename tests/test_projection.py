"""An external P (the authors' OrthP_512X512.mat or any file): read, checked, used and recorded."""

import hashlib
import json

import numpy as np
import pytest
import scipy.io
import torch
from safetensors.numpy import save_file

import sdml_ext
from sdml_ext import cli
from sdml_ext import train
from sdml_ext.projection import ORTHONORMAL_TOLERANCE, load_projection
from helpers import run_config


def _orthogonal(n, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def test_authors_style_mat_file_first_c_columns(tmp_path):
    full = _orthogonal(16)
    path = tmp_path / "OrthP_16X16.mat"
    scipy.io.savemat(path, {"OrthP": full})
    P, source = load_projection(path, d=16, c=5)
    assert P.dtype == torch.float32 and P.shape == (16, 5) and P.is_contiguous()
    np.testing.assert_array_equal(P.numpy(), full[:, :5].astype(np.float32))
    assert source["key"] == "OrthP" and source["file"] == str(path)
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (source["columns"], source["of_columns"]) == (5, 16) and source["orthonormality_error"] < 1e-12


@pytest.mark.parametrize("ext", ["npy", "npz", "safetensors"])
def test_other_formats_and_key_choice(tmp_path, ext):
    full = _orthogonal(8, seed=1).astype(np.float32)
    path = tmp_path / f"p.{ext}"
    if ext == "npy":
        np.save(path, full)
    elif ext == "npz":
        np.savez(path, P=full, mean=np.zeros((3, 2)))  # two matrices: the one named P is taken
    else:
        save_file({"projection": full, "bias": np.zeros(4, np.float32)}, str(path))
    P, source = load_projection(path, d=8, c=3)
    np.testing.assert_array_equal(P.numpy(), full[:, :3])
    assert source["key"] in ("P", "projection")


def test_bad_projections_are_refused_naming_the_defect(tmp_path):
    full = _orthogonal(6)
    cases = {
        "rows.npy": (full[:5], "P has 5 rows but the code width is 6; train with --code-dim 5"),
        "narrow.npy": (full[:, :2], "P has 2 columns but the dataset has 3 classes"),
        "nan.npy": (np.where(np.eye(6) > 0, np.nan, full), "NaN or Inf"),
        "skewed.npy": (full * (1 + 10 * ORTHONORMAL_TOLERANCE), "are not orthonormal"),
        "vector.npy": (full[0], "expected a real d x c matrix"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            load_projection(tmp_path / name, d=6, c=3)
    scipy.io.savemat(tmp_path / "two.mat", {"A": full, "B": full})
    with pytest.raises(ValueError, match="cannot tell which array is P .*A, B.*projection_key"):
        load_projection(tmp_path / "two.mat", d=6, c=3)
    assert load_projection(tmp_path / "two.mat", d=6, c=3, key="B")[1]["key"] == "B"
    with pytest.raises(ValueError, match="has no key 'C'"):
        load_projection(tmp_path / "two.mat", d=6, c=3, key="C")
    (tmp_path / "p.txt").write_text("1 0\n0 1\n")
    with pytest.raises(ValueError, match="unknown extension '.txt'"):
        load_projection(tmp_path / "p.txt", d=2, c=2)
    with pytest.raises(FileNotFoundError, match="absent.mat"):
        load_projection(tmp_path / "absent.mat", d=2, c=2)


SMALL = run_config(
    {"n_train": 100, "n_val": 50, "n_test": 50, "n_classes": 5},
    strategy="serial", epochs=1, hidden=[32], code_dim=16, lr=[1e-3], batch_size=50,
)


def test_training_with_an_external_projection_records_it(tmp_path, capsys):
    full = _orthogonal(16, seed=3)
    mat = tmp_path / "OrthP_16X16.mat"
    scipy.io.savemat(mat, {"OrthP": full})
    settings = tmp_path / "small.toml"
    settings.write_text(SMALL)
    out = tmp_path / "bundle"
    code = cli.run(train.main, ["--dataset", "synthetic", "--modalities", "m0,m1", "--config", str(settings),
                                "--projection", str(mat), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    bundle = sdml_ext.load(out)
    np.testing.assert_array_equal(bundle.P.numpy(), full[:, :5].astype(np.float32))
    assert bundle.projection_seed is None
    assert bundle.projection_source["sha256"] == hashlib.sha256(mat.read_bytes()).hexdigest()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["projection"]["seed"] is None and manifest["projection"]["source"]["file"] == str(mat)
    # A modality added later uses the bundle's P, not a new one.
    assert cli.run(train.main, ["--add-modality", "m2", "--into", str(out)]) == 0
    assert torch.equal(sdml_ext.load(out).P, bundle.P)

    capsys.readouterr()
    np.save(tmp_path / "wide.npy", _orthogonal(32))
    code = cli.run(train.main, ["--dataset", "synthetic", "--config", str(settings), "--projection",
                                str(tmp_path / "wide.npy"), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and "--code-dim 32" in err and "Traceback" not in err
