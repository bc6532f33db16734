"""Bundles: what the manifest records, loading without pickle, atomic and non-destructive writes."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

import sdml_ext
from sdml_ext.store import bundle as bundle_mod
from sdml_ext.store.bundle import BundleError, add_to_bundle, save_bundle
from sdml_ext.data import make_synthetic
from sdml_ext.model import DSAE, make_projection, tensor_checksum
from sdml_ext.preprocess import Preprocessor
from sdml_ext.store.files import sha256_file
from sdml_ext.engine.strategies import train_tasks
from sdml_ext.engine.training import TrainOptions, make_tasks

OPTS = TrainOptions(hidden=(32, 32), code_dim=16, batch_size=50, epochs=2, seed=7)


@pytest.fixture(scope="module")
def trained():
    ds = make_synthetic(3, n_train=100, n_val=20, n_test=30, n_classes=4, seed=3)
    P = make_projection(16, 4, OPTS.seed)
    report = train_tasks(make_tasks(ds, P, OPTS), "serial")
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
    with pytest.raises(BundleError, match="unreadable bundle manifest"):
        sdml_ext.load(path)


def test_the_same_weights_make_the_same_files(tmp_path, trained):
    """A bundle's files are a function of its tensors: saved again (as a resumed run saves what an
    uninterrupted one would), every weights file and its sha256 come out byte for byte the same.
    Several saves, because a map written in random order (safetensors' metadata) differs only by chance."""
    saves = [write(tmp_path / f"b{i}", trained) for i in range(6)]
    files = [f for f in os.listdir(saves[0]) if f.endswith(".safetensors")]
    for path in saves[1:]:
        assert all((path / f).read_bytes() == (saves[0] / f).read_bytes() for f in files)
        shas = lambda p: [m["sha256"] for m in json.loads((p / "manifest.json").read_text())["modalities"]]
        assert shas(path) == shas(saves[0])


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
    # No temporary files left; the writers' lock file stays (removing it would race a new writer).
    assert [f for f in os.listdir(path) if f.startswith(".")] == [".lock"]


def _tamper(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _set(*keys_value):
    *keys, value = keys_value

    def change(manifest):
        obj = manifest
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value

    return change


def _delete(*keys):
    def change(manifest):
        obj = manifest
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_delete("modalities", 0, "file"), r"modalities\[0\]\.file is missing"),
        (_delete("modalities", 1, "sha256"), r"modalities\[1\]\.sha256 is missing"),
        (_set("modalities", 0, "model", "extra", 1), r"modalities\[0\]\.model has unknown keys \['extra'\]"),
        (_set("modalities", 0, "model", [64, 16]), r"modalities\[0\]\.model must be an object"),
        (_set("modalities", 0, "model", "hidden", "32"), r"modalities\[0\]\.model\.hidden must be a non-empty list"),
        (_set("modalities", 2, "model", "code_dim", 17), r"modalities\[2\]\.model\.code_dim is 17 but P has 16 rows"),
        (_set("config", "epochs=2"), "config must be an object"),
        (_set("config", "dataset_options", [1]), r"config\.dataset_options must be an object"),
        (_set("modalities", 1, "name", "m0"), r"modalities\[1\]\.name must be a non-empty name used once, got 'm0'"),
        (_set("modalities", 0, "file", "../b2/modality-00.safetensors"), r"modalities\[0\]\.file must be the name of a file inside"),
        (_set("modalities", 0, "file", "/etc/passwd"), r"modalities\[0\]\.file must be the name of a file inside"),
        (_set("modalities", 1, "file", "modality-00.safetensors"), "names a file twice"),
        (_set("projection", "shape", [16, 5]), r"projection\.shape must be \[d, 4\]"),
        (_set("modalities", 0, "preprocess", "zscore"), r"modalities\[0\]\.preprocess must be one of"),
        (_set("class_names", []), "class_names must be a non-empty list of strings"),
        (_set("format_version", "1"), "format_version must be an integer, got '1'"),
        (_set("format_version", 2), r"format version 2 is not supported \(this sdml_ext reads version 1\)"),
    ],
)
def test_a_malformed_manifest_is_refused_on_load_naming_the_field(tmp_path, trained, change, message):
    path = write(tmp_path / "b", trained)
    _tamper(path, change)
    with pytest.raises(BundleError, match=message):
        sdml_ext.load(path)
    with pytest.raises(BundleError, match=message):  # and before adding to it
        add_to_bundle(path, [], run={})


def test_a_network_bigger_than_its_weights_is_never_built(tmp_path, trained):
    path = write(tmp_path / "b", trained)
    # [10^7, 10^7] hidden units would be ~800 TB of float32 weights.
    _tamper(path, _set("modalities", 1, "model", "hidden", [10**7, 10**7]))
    b = sdml_ext.load(path)
    with pytest.raises(BundleError, match=r"weights do not fit the network .* is \[32, 48\] in the file, \[10000000, 48\]"):
        b.encode("m1", np.zeros((1, 48), np.float32))
    b.encode("m0", np.zeros((1, 64), np.float32))  # the others are intact


def _rewrite_modality_file(path, index, change):
    """Rewrite a modality's safetensors file through `change(tensors)` and fix its checksum,
    as someone crafting a bundle would."""
    from safetensors.numpy import load_file, save_file

    file = path / f"modality-{index:02d}.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))
    _tamper(path, _set("modalities", index, "sha256", sha256_file(file)))


def test_preprocess_tensors_of_the_wrong_length_are_refused(tmp_path, trained):
    path = write(tmp_path / "b", trained)
    _rewrite_modality_file(path, 1, lambda t: t.update({"preprocess.shift": t["preprocess.shift"][:-1]}))
    with pytest.raises(BundleError, match=r"preprocess\.shift must be a float32 tensor of shape \[48\], got .*\[47\]"):
        sdml_ext.load(path).encode("m1", np.zeros((1, 48), np.float32))


def test_weights_of_another_dtype_or_extra_tensors_are_refused(tmp_path, trained):
    path = write(tmp_path / "b", trained)
    _rewrite_modality_file(path, 0, lambda t: t.update({k: v.astype(np.float64) for k, v in t.items() if k.startswith("encoder.0")}))
    _rewrite_modality_file(path, 1, lambda t: t.update({"encoder.9.weight": np.zeros((2, 2), np.float32)}))
    b = sdml_ext.load(path)
    with pytest.raises(BundleError, match="is torch.float64, expected float32"):
        b.encode("m0", np.zeros((1, 64), np.float32))
    with pytest.raises(BundleError, match=r"encoder\.9\.weight is \[2, 2\] in the file, not part of the network"):
        b.encode("m1", np.zeros((1, 48), np.float32))


def test_a_link_out_of_the_bundle_is_not_followed(tmp_path, trained):
    path = write(tmp_path / "b", trained)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(path / "modality-00.safetensors", outside)
    os.symlink(outside, path / "modality-00.safetensors")  # same bytes, so the checksum matches
    b = sdml_ext.load(path)
    with pytest.raises(BundleError, match="leads outside the bundle directory"):
        b.encode("m0", np.zeros((1, 64), np.float32))
    os.remove(path / "modality-00.safetensors")
    os.replace(outside, path / "m0-moved.safetensors")
    os.symlink("m0-moved.safetensors", path / "modality-00.safetensors")  # a link inside the bundle is fine
    sdml_ext.load(path).encode("m0", np.zeros((1, 64), np.float32))


@pytest.mark.parametrize("batch_size", [-1, 0, 1.5, True, "8"])
def test_encode_batch_size_must_be_a_positive_integer(tmp_path, trained, batch_size):
    b = sdml_ext.load(write(tmp_path / "b", trained))
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size!r}"):
        b.encode("m1", np.zeros((5, 48), np.float32), batch_size=batch_size)


def test_encode_in_batches_matches_one_pass(tmp_path, trained):
    ds, _, _ = trained
    b = sdml_ext.load(write(tmp_path / "b", trained))
    x = ds["m1"].test.features
    torch.testing.assert_close(b.encode("m1", x, batch_size=7), b.encode("m1", x))


def test_unsaved_bundle_encodes_like_the_written_one(tmp_path, trained):
    ds, P, report = trained
    written = sdml_ext.load(write(tmp_path / "b", trained))
    unsaved = sdml_ext.Bundle.unsaved(P, ds.class_names, report.modalities)
    assert unsaved.modality_names == written.modality_names and unsaved.path is None
    x = ds["m2"].test.features
    torch.testing.assert_close(unsaved.encode("m2", x), written.encode("m2", x), rtol=0, atol=0)
    # After a base bundle's modalities: old ones from disk, new ones from memory.
    base = sdml_ext.load(write(tmp_path / "two", trained, n=2))
    both = sdml_ext.Bundle.unsaved(P, ds.class_names, report.modalities[2:], base=base)
    assert both.modality_names == ["m0", "m1", "m2"] and both.path == base.path
    torch.testing.assert_close(both.encode("m2", x), written.encode("m2", x), rtol=0, atol=0)


def test_permissions_follow_the_umask_which_is_never_changed(tmp_path, trained, monkeypatch):
    from sdml_ext.store.files import current_umask
    from sdml_ext.data import save_npz

    def forbidden(*args):
        raise AssertionError("os.umask changes the umask of every thread, even to read it")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", forbidden)
        assert current_umask() == 0o027
        path = write(tmp_path / "b", trained)
        assert os.stat(path).st_mode & 0o777 == 0o750
        assert {os.stat(path / f).st_mode & 0o777 for f in os.listdir(path)} == {0o640}
        save_npz(trained[0], tmp_path / "set.npz")
        assert os.stat(tmp_path / "set.npz").st_mode & 0o777 == 0o640
        # Without /proc (not Linux): inferred from a fresh directory's mode.
        real_open = open

        def no_proc(file, *args, **kwargs):
            if str(file).startswith("/proc/"):
                raise OSError(2, "No such file or directory")
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_proc)
        assert current_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)


@pytest.mark.parametrize("mode", ["l2", "none"])
def test_preprocess_modes_round_trip_through_a_bundle(tmp_path, mode):
    from safetensors import safe_open

    ds = make_synthetic(2, n_train=100, n_val=20, n_test=30, n_classes=4, seed=3)
    opts = TrainOptions(hidden=(32,), code_dim=16, batch_size=50, epochs=1, seed=7, preprocess=mode)
    P = make_projection(16, 4, 7)
    report = train_tasks(make_tasks(ds, P, opts), "serial")
    path = save_bundle(tmp_path / mode, P=P, projection_seed=7, results=report.modalities, class_names=ds.class_names,
                       dataset={"name": ds.name}, config={}, run=report.summary())
    b = sdml_ext.load(path)
    assert [m["preprocess"] for m in b.manifest["modalities"]] == [mode, mode]
    with safe_open(str(path / "modality-01.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("preprocess.")]  # nothing fitted to store
    x = torch.from_numpy(ds["m1"].test.features)
    result = report.modalities[1]
    model = DSAE(**result.model_options)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in result.state.items()})
    with torch.no_grad():
        expected = model.encode(torch.nn.functional.normalize(x, dim=1) if mode == "l2" else x)
    torch.testing.assert_close(b.encode("m1", x), expected)
    scaled = b.encode("m1", 3 * x)  # l2 removes a row's scale; none keeps it
    assert torch.allclose(scaled, expected, atol=1e-5) == (mode == "l2")
