"""describe_dataset and load_modalities: the shapes and classes of a dataset without its
features, and some modalities loaded alone -- the same arrays as the full load, and for the
layouts read per modality (READ_PER_MODALITY) without touching the other modalities' features:
those are made unreadable here (data missing behind an intact header), so reading them fails."""

import h5py
import numpy as np
import pytest
import scipy.io

from data_files import (
    XMEDIA,
    assert_same_dataset,
    authors_h5,
    views_cell,
    write_generic,
    write_matlab_v73,
    xmedia_arrays,
)

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


@pytest.mark.parametrize("fmt", ["npz", "h5", "dir", "mat"])
def test_generic_selective_load_is_the_full_load_of_those_modalities(tmp_path, arrays, fmt):
    path = write_generic(fmt, tmp_path / f"set.{fmt}" if fmt != "dir" else tmp_path / "set", arrays)
    full = load_dataset(fmt, path)
    assert reads_per_modality(fmt, path) == (fmt != "mat")  # scipy reads a v5 .mat file whole
    assert describe_dataset(fmt, path) == full.info()
    assert full.info().shapes == {"m0": (9, 5), "m1": (6, 3), "m2": (7, 4)}
    for names in (["m1"], ["m2", "m0"], ["m0", "m1", "m2"]):
        assert_same_dataset(load_modalities(fmt, path, names), _subset(full, names))
    with pytest.raises(ValueError, match="no modality 'm9'; present: m0, m1, m2"):
        load_modalities(fmt, path, ["m9"])


@pytest.mark.parametrize("fmt", ["npz", "h5", "dir"])
def test_other_modalities_features_are_never_read(tmp_path, arrays, fmt):
    others = [k for k in arrays if k.startswith(("m0_", "m2_")) and k.endswith("_x")]
    path = write_generic(fmt, tmp_path / f"set.{fmt}" if fmt != "dir" else tmp_path / "set", arrays, unreadable=others)
    with pytest.raises(ValueError, match="cannot read key 'm0_train_x'"):
        load_dataset(fmt, path)  # the fixture bites: reading those keys fails
    intact = load_dataset(fmt, write_generic(fmt, tmp_path / f"ok.{fmt}" if fmt != "dir" else tmp_path / "ok", arrays))
    assert_same_dataset(load_modalities(fmt, path, ["m1"]), _subset(intact, ["m1"]))
    assert describe_dataset(fmt, path) == intact.info()


def test_authors_h5_reads_only_the_chosen_modality_features(tmp_path):
    authors_h5(tmp_path / "ok.h5")
    full = load_dataset(None, tmp_path / "ok.h5", n_val=40)
    with h5py.File(tmp_path / "ok.h5") as f:
        arrays = {k: f[k][()] for k in f}
    unreadable = ("train_imgs_deep", "test_imgs_deep")
    path = write_generic("h5", tmp_path / "no-images.h5", arrays, unreadable=unreadable)
    with pytest.raises(ValueError, match="cannot read key 'train_imgs_deep'"):
        load_dataset(None, path, n_val=40)
    assert reads_per_modality(None, path, n_val=40)
    for where in (tmp_path / "ok.h5", path):
        text = load_modalities(None, where, ["text"], n_val=40)
        assert_same_dataset(text, _subset(full, ["text"], source=f"SDML authors' HDF5 file {where}"))
        assert describe_dataset(None, where, n_val=40) == full.info()
    assert full.info().shapes == {"image": (12, 8), "text": (15, 5)}


def test_layouts_read_whole_give_the_same_modalities(tmp_path):
    arrays = xmedia_arrays()
    scipy.io.savemat(tmp_path / "x.mat", arrays)
    write_matlab_v73(tmp_path / "x73.mat", arrays)
    rng = np.random.default_rng(0)
    y = np.repeat([1, 2, 3], 10)
    scipy.io.savemat(tmp_path / "mv.mat", {"fea": views_cell(rng.random((30, 4)), rng.random((30, 6))), "gt": y})
    cases = [("xmedia", tmp_path / "x.mat", ["audio", "image"]), ("xmedia", tmp_path / "x73.mat", ["video"]),
             ("multiview-mat", tmp_path / "mv.mat", ["view2"]), ("mfeat", None, ["kar", "fou"]),
             ("synthetic", None, ["m1"])]
    for name, path, names in cases:
        full = load_dataset(name, path)
        assert not reads_per_modality(name, path)
        assert describe_dataset(name, path) == full.info()
        assert_same_dataset(load_modalities(name, path, names), _subset(full, names))
    assert describe_dataset("xmedia", tmp_path / "x.mat").shapes == {m: (v[2], v[1]) for m, v in XMEDIA.items()}


def test_generic_matlab_v73_is_read_per_modality(tmp_path, arrays):
    numeric = {k: v for k, v in arrays.items() if v.dtype.kind != "U"}  # no strings: default names
    path = tmp_path / "set73.mat"
    write_matlab_v73(path, numeric)
    full = load_dataset("mat", path)
    assert reads_per_modality("mat", path) and full.modality_names == ["m0", "m1", "m2"]
    assert describe_dataset("mat", path) == full.info()
    assert_same_dataset(load_modalities("mat", path, ["m2"]), _subset(full, ["m2"]))
