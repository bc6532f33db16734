"""describe_dataset and load_modalities: the shapes and classes of a dataset without its
features, and some modalities loaded alone -- the same arrays as the full load, and for the
layouts read per modality (READ_PER_MODALITY) without touching the other modalities' features:
those are made unreadable here (data missing behind an intact header), so reading them fails."""

import zipfile

import h5py
import numpy as np
import pytest
import scipy.io

from test_data_formats import XMEDIA, _assert_same, _authors_h5, _views_cell, _write_matlab_v73, _xmedia_arrays

from sdml_ext.data import (
    Dataset,
    describe_dataset,
    load_dataset,
    load_modalities,
    make_synthetic,
    reads_per_modality,
    to_arrays,
)


def _subset(ds: Dataset, names, source=None) -> Dataset:
    return Dataset(ds.name, [ds[n] for n in names], ds.class_names, multilabel=ds.multilabel,
                   source=ds.source if source is None else source)


@pytest.fixture(scope="module", params=["ids", "multi-hot", "ids-no-class-names"])
def arrays(request):
    ds = make_synthetic(n_modalities=3, dims=(5, 3, 4), n_classes=4, n_train=(9, 6, 7), n_val=(0, 2, 3),
                        n_test=(4, 2, 3), multilabel=request.param == "multi-hot", unlabelled=0.2, seed=3)
    arrays = to_arrays(ds)
    if request.param == "ids-no-class-names":
        del arrays["class_names"]  # the classes are counted over every modality's label ids
    return arrays


def _write(fmt, path, arrays, unreadable=()):
    """The generic layout in `fmt`; the keys in `unreadable` keep their header (shape, dtype)
    but lose their data, so that reading them fails."""
    if fmt == "npz":
        with zipfile.ZipFile(path, "w") as z:
            for key, value in arrays.items():
                with z.open(f"{key}.npy", "w") as member:
                    np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(value))
                    if key not in unreadable:
                        member.write(np.ascontiguousarray(value).tobytes())
    elif fmt == "dir":
        path.mkdir()
        for key, value in arrays.items():
            np.save(path / f"{key}.npy", value)
            if key in unreadable:  # keep the header only
                with open(path / f"{key}.npy", "r+b") as f:
                    np.lib.format.read_magic(f)
                    np.lib.format.read_array_header_1_0(f)
                    f.truncate(f.tell())
    elif fmt == "h5":
        raws = []
        with h5py.File(path, "w") as f:
            for key, value in arrays.items():
                value = value.astype("S") if value.dtype.kind == "U" else value
                if key in unreadable:  # data in an external file, removed below
                    raw = path.with_name(f"{path.stem}-{key}.raw")
                    raw.write_bytes(np.ascontiguousarray(value).tobytes())
                    f.create_dataset(key, shape=value.shape, dtype=value.dtype, external=[(str(raw), 0, value.nbytes)])
                    raws.append(raw)
                else:
                    f[key] = value
        for raw in raws:
            raw.unlink()
    else:
        assert not unreadable
        scipy.io.savemat(path, arrays)
    return path


@pytest.mark.parametrize("fmt", ["npz", "h5", "dir", "mat"])
def test_generic_selective_load_is_the_full_load_of_those_modalities(tmp_path, arrays, fmt):
    path = _write(fmt, tmp_path / f"set.{fmt}" if fmt != "dir" else tmp_path / "set", arrays)
    full = load_dataset(fmt, path)
    assert reads_per_modality(fmt, path) == (fmt != "mat")  # scipy reads a v5 .mat file whole
    assert describe_dataset(fmt, path) == full.info()
    assert full.info().shapes == {"m0": (9, 5), "m1": (6, 3), "m2": (7, 4)}
    for names in (["m1"], ["m2", "m0"], ["m0", "m1", "m2"]):
        _assert_same(load_modalities(fmt, path, names), _subset(full, names))
    with pytest.raises(ValueError, match="no modality 'm9'; present: m0, m1, m2"):
        load_modalities(fmt, path, ["m9"])


@pytest.mark.parametrize("fmt", ["npz", "h5", "dir"])
def test_other_modalities_features_are_never_read(tmp_path, arrays, fmt):
    others = [k for k in arrays if k.startswith(("m0_", "m2_")) and k.endswith("_x")]
    path = _write(fmt, tmp_path / f"set.{fmt}" if fmt != "dir" else tmp_path / "set", arrays, unreadable=others)
    with pytest.raises(ValueError, match="cannot read key 'm0_train_x'"):
        load_dataset(fmt, path)  # the fixture bites: reading those keys fails
    intact = load_dataset(fmt, _write(fmt, tmp_path / f"ok.{fmt}" if fmt != "dir" else tmp_path / "ok", arrays))
    _assert_same(load_modalities(fmt, path, ["m1"]), _subset(intact, ["m1"]))
    assert describe_dataset(fmt, path) == intact.info()


def test_authors_h5_reads_only_the_chosen_modality_features(tmp_path):
    _authors_h5(tmp_path / "ok.h5")
    full = load_dataset(None, tmp_path / "ok.h5", n_val=40)
    with h5py.File(tmp_path / "ok.h5") as f:
        arrays = {k: f[k][()] for k in f}
    unreadable = ("train_imgs_deep", "test_imgs_deep")
    path = _write("h5", tmp_path / "no-images.h5", arrays, unreadable=unreadable)
    with pytest.raises(ValueError, match="cannot read key 'train_imgs_deep'"):
        load_dataset(None, path, n_val=40)
    assert reads_per_modality(None, path, n_val=40)
    for where in (tmp_path / "ok.h5", path):
        text = load_modalities(None, where, ["text"], n_val=40)
        _assert_same(text, _subset(full, ["text"], source=f"SDML authors' HDF5 file {where}"))
        assert describe_dataset(None, where, n_val=40) == full.info()
    assert full.info().shapes == {"image": (12, 8), "text": (15, 5)}


def test_layouts_read_whole_give_the_same_modalities(tmp_path):
    arrays = _xmedia_arrays()
    scipy.io.savemat(tmp_path / "x.mat", arrays)
    _write_matlab_v73(tmp_path / "x73.mat", arrays)
    rng = np.random.default_rng(0)
    y = np.repeat([1, 2, 3], 10)
    scipy.io.savemat(tmp_path / "mv.mat", {"fea": _views_cell(rng.random((30, 4)), rng.random((30, 6))), "gt": y})
    cases = [("xmedia", tmp_path / "x.mat", ["audio", "image"]), ("xmedia", tmp_path / "x73.mat", ["video"]),
             ("multiview-mat", tmp_path / "mv.mat", ["view2"]), ("mfeat", None, ["kar", "fou"]),
             ("synthetic", None, ["m1"])]
    for name, path, names in cases:
        full = load_dataset(name, path)
        assert not reads_per_modality(name, path)
        assert describe_dataset(name, path) == full.info()
        _assert_same(load_modalities(name, path, names), _subset(full, names))
    assert describe_dataset("xmedia", tmp_path / "x.mat").shapes == {m: (v[2], v[1]) for m, v in XMEDIA.items()}


def test_generic_matlab_v73_is_read_per_modality(tmp_path, arrays):
    numeric = {k: v for k, v in arrays.items() if v.dtype.kind != "U"}  # no strings: default names
    path = tmp_path / "set73.mat"
    _write_matlab_v73(path, numeric)
    full = load_dataset("mat", path)
    assert reads_per_modality("mat", path) and full.modality_names == ["m0", "m1", "m2"]
    assert describe_dataset("mat", path) == full.info()
    _assert_same(load_modalities("mat", path, ["m2"]), _subset(full, ["m2"]))
