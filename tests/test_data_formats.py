"""sdml_ext.data file loaders: small files written in tmp_path for every format, bad input, and
the real fixtures under $SDML_SHARED_DATA (skipped when that is unset)."""

import os

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse

from data_files import XMEDIA, assert_same_dataset, authors_h5, views_cell, write_matlab_v73, xmedia_arrays

from sdml_ext.data import (
    AUTHORS_H5_TEST_ROWS,
    MissingKeyError,
    detect_layout,
    load_dataset,
    load_generic,
    load_multiview_mat,
    load_xmedia,
    make_synthetic,
    save_npz,
    split_paired_views,
    to_arrays,
)


# --- XMedia ---------------------------------------------------------------------------------


def _check_xmedia(ds, arrays):
    assert ds.name == "xmedia" and ds.modality_names == list(XMEDIA)
    assert ds.num_classes == 4 and ds.class_names == ["1", "2", "3", "4"]
    for name, (keys, dim, n_tr, n_te) in XMEDIA.items():
        m = ds[name]
        n_test = (n_te + 1) // 2
        assert (m.dim, m.train.n, m.test.n, m.val.n) == (dim, n_tr, n_test, n_te - n_test)
        np.testing.assert_allclose(m.train.features, arrays[keys[0]], rtol=1e-6)
        np.testing.assert_allclose(m.test.features, arrays[keys[1]][:n_test], rtol=1e-6)  # first half
        np.testing.assert_allclose(m.val.features, arrays[keys[1]][n_test:], rtol=1e-6)  # second half
        np.testing.assert_array_equal(m.train.labels, arrays[keys[2]].ravel() - 1)


def test_xmedia_mat_v5_with_sparse_text(tmp_path):
    arrays = xmedia_arrays()
    stored = dict(arrays, T_tr_BOW=scipy.sparse.csc_matrix(np.abs(arrays["T_tr_BOW"]) > 1))
    arrays["T_tr_BOW"] = (np.abs(arrays["T_tr_BOW"]) > 1).astype(float)
    path = tmp_path / "xmedia.mat"
    scipy.io.savemat(path, stored)
    _check_xmedia(load_dataset("xmedia", path), arrays)
    _check_xmedia(load_dataset(None, path), arrays)  # detected from the keys
    sub = load_xmedia(path, modalities=["audio", "image"], class_names=list("abcd"))
    assert sub.modality_names == ["audio", "image"] and sub.class_names == list("abcd")


def test_xmedia_mat_v73_is_transposed_back(tmp_path):
    arrays = xmedia_arrays(seed=1)
    path = tmp_path / "xmedia73.mat"
    write_matlab_v73(path, arrays)
    _check_xmedia(load_dataset("xmedia", path), arrays)


def test_xmedia_missing_key_and_mismatched_rows(tmp_path):
    arrays = xmedia_arrays()
    del arrays["teAudCat"]
    path = tmp_path / "broken.mat"
    scipy.io.savemat(path, arrays)
    with pytest.raises(KeyError) as info:
        load_dataset("xmedia", path)
    message = str(info.value)
    assert "'teAudCat'" in message and "broken.mat" in message and "keys present:" in message and "A_te" in message
    arrays = xmedia_arrays()
    arrays["trVidCat"] = arrays["trVidCat"][:-1]
    scipy.io.savemat(path, arrays)
    with pytest.raises(ValueError, match=r"broken.mat: features key 'V_tr_CNN' has shape \(6, 6\) but labels key 'trVidCat' has 5"):
        load_xmedia(path)
    arrays = xmedia_arrays()
    arrays["trImgCat"][0] = 0
    scipy.io.savemat(path, arrays)
    with pytest.raises(ValueError, match="1-based"):
        load_xmedia(path)


# --- authors' HDF5 --------------------------------------------------------------------------


def test_authors_h5_wikipedia_split(tmp_path):
    path = tmp_path / "wiki.h5"
    authors_h5(path)
    ds = load_dataset("wikipedia", path)
    assert ds.name == "wikipedia" and ds.modality_names == ["image", "text"] and not ds.multilabel
    assert ds.num_classes == 10 and ds.class_names[0] == "1"
    with h5py.File(path) as f:
        test_img = f["test_imgs_deep"][()]
        first_label = f["train_imgs_labels"][0, 0]
    img = ds["image"]
    assert (img.train.n, img.val.n, img.test.n) == (12, 231, 9)
    assert ds["text"].train.n == 15
    np.testing.assert_array_equal(img.val.features, test_img[:231])  # head of the test set
    np.testing.assert_array_equal(img.test.features, test_img[231:])
    assert img.train.labels[0] == first_label - 1 and img.train.labels.min() == 0
    small = load_dataset("wikipedia", path, n_val=40)
    assert (small["text"].val.n, small["text"].test.n) == (40, 200)
    with pytest.raises(ValueError, match="n_val=300 exceeds the 240 rows of test key 'test_imgs_deep'"):
        load_dataset("nus-wide", path, n_val=300)
    with pytest.raises(ValueError, match="its 240 test images match none of wikipedia \\(693\\), nus-wide"):
        load_dataset("auto", path)
    assert load_dataset("auto", path, n_val=10)["image"].val.n == 10


def test_authors_h5_mscoco_multi_hot(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "coco.h5"
    authors_h5(path, n_train=20, n_test=30, labels=lambda n: (rng.random((n, 7)) < 0.3).astype(np.float64))
    ds = load_dataset("mscoco", path, n_val=10)
    assert ds.multilabel and ds.num_classes == 7
    assert ds["image"].train.labels.shape == (20, 7) and ds["text"].test.labels.shape == (20, 7)
    assert ds["text"].val.labels.shape == (10, 7)


def test_authors_h5_missing_key(tmp_path):
    path = tmp_path / "partial.h5"
    authors_h5(path)
    with h5py.File(path, "a") as f:
        del f["test_texts_labels"]
    with pytest.raises(MissingKeyError, match=r"partial.h5: missing key 'test_texts_labels'; keys present: test_imgs_deep, "):
        load_dataset("wikipedia", path)


# --- multi-view .mat ------------------------------------------------------------------------


def test_multiview_mat_orientation_sparse_and_split(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([3, 5, 9], 10)  # arbitrary label values -> classes 0, 1, 2 named "3", "5", "9"
    a = rng.standard_normal((30, 4))
    b = scipy.sparse.random(7, 30, density=0.3, random_state=1, format="csc")  # features x samples
    path = tmp_path / "views.mat"
    scipy.io.savemat(path, {"X": views_cell(a, b), "Y": y.reshape(-1, 1)})
    ds = load_multiview_mat(path, modality_names=["dense", "sparse"], seed=2)
    assert ds.name == "views" and ds.class_names == ["3", "5", "9"]
    assert [m.dim for m in ds] == [4, 7] and ds["sparse"].train.features.dtype == np.float32
    assert (ds["dense"].train.n, ds["dense"].val.n, ds["dense"].test.n) == (18, 6, 6)
    # The same rows go to the same split in every view.
    dense_b = b.toarray().T.astype(np.float32)
    rows = [int(np.flatnonzero((a.astype(np.float32) == r).all(1))[0]) for r in ds["dense"].test.features]
    np.testing.assert_array_equal(ds["sparse"].test.features, dense_b[rows])
    assert ds.modality_names == ["dense", "sparse"]
    assert load_dataset("auto", path)["view2"].dim == 7


def test_multiview_mat_v73_cells_and_sparse(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat([1, 2], 6)
    a = rng.standard_normal((12, 3))
    b = scipy.sparse.random(12, 5, density=0.5, random_state=2, format="csc")
    path = tmp_path / "views73.mat"
    write_matlab_v73(path, {"fea": views_cell(a, b), "gt": y.reshape(-1, 1).astype(float)})
    ds = load_dataset("multiview-mat", path)
    assert ds.modality_names == ["view1", "view2"] and [m.dim for m in ds] == [3, 5]
    total = np.concatenate([ds["view2"].train.features, ds["view2"].val.features, ds["view2"].test.features])
    np.testing.assert_allclose(np.sort(total.sum(1)), np.sort(b.toarray().sum(1)), rtol=1e-5)


def test_multiview_mat_bad_input(tmp_path):
    path = tmp_path / "bad.mat"
    scipy.io.savemat(path, {"views": views_cell(np.zeros((4, 2))), "gt": np.arange(4)})
    with pytest.raises(KeyError, match=r"bad.mat: no views key \(looked for fea, X\); keys present: views, gt"):
        load_multiview_mat(path)
    scipy.io.savemat(path, {"fea": views_cell(np.ones((4, 4))), "gt": np.arange(4)})
    with pytest.raises(ValueError, match=r"view fea\{1\} has shape \(4, 4\) and there are 4 labels: cannot tell.*samples_as_rows"):
        load_multiview_mat(path)
    assert load_multiview_mat(path, samples_as_rows=True, fractions=(0.5, 0.25, 0.25))["view1"].dim == 4
    scipy.io.savemat(path, {"fea": views_cell(np.ones((5, 3))), "gt": np.arange(4)})
    with pytest.raises(ValueError, match=r"bad.mat: view fea\{1\} has 5 samples but there are 4 labels"):
        load_multiview_mat(path, samples_as_rows=True)


# --- generic layout -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return make_synthetic(n_modalities=2, dims=(5, 3), n_classes=3, n_train=(9, 6), n_val=(0, 2), n_test=4,
                          unlabelled=0.3, seed=4)


@pytest.fixture(scope="module")
def small_multi():
    return make_synthetic(n_modalities=2, dims=(4, 6), n_classes=5, n_train=8, n_val=3, n_test=(2, 0),
                          multilabel=True, unlabelled=0.25, seed=5)


@pytest.mark.parametrize("which", ["small", "small_multi"])
def test_save_npz_round_trip_is_atomic(tmp_path, request, which):
    ds = request.getfixturevalue(which)
    path = tmp_path / "set.npz"
    path.write_bytes(b"old content")  # replaced, not appended to
    save_npz(ds, path)
    assert sorted(os.listdir(tmp_path)) == ["set.npz"]  # no temporary file left behind
    assert_same_dataset(load_dataset("npz", path), ds)
    assert_same_dataset(load_dataset(None, str(path)), ds)


def test_unknown_loader_options_are_named(tmp_path, small):
    save_npz(small, tmp_path / "set.npz")
    with pytest.raises(ValueError, match=r"dataset 'npz': unknown dataset option\(s\) \['n_val'\]; it takes none"):
        load_dataset(None, tmp_path / "set.npz", n_val=3)  # checked once the layout is detected
    with pytest.raises(ValueError, match=r"dataset 'mfeat': unknown dataset option\(s\) \['n_train'\]; valid: seed, fractions, views"):
        load_dataset("mfeat", n_train=10)
    with pytest.raises(ValueError, match=r"dataset 'xmedia': unknown dataset option\(s\) \['bogus'\]; valid: modalities, class_names"):
        load_dataset("xmedia", tmp_path / "set.npz", bogus=1)


def test_generic_h5_mat_and_directory_round_trip(tmp_path, small, small_multi):
    for ds in (small, small_multi):
        arrays = to_arrays(ds)
        h5 = tmp_path / f"{ds.name}{ds.multilabel}.h5"
        with h5py.File(h5, "w") as f:
            for key, value in arrays.items():
                f[key] = value.astype("S") if value.dtype.kind == "U" else value
        assert_same_dataset(load_dataset("h5", h5), ds)
        mat = tmp_path / f"{ds.name}{ds.multilabel}.mat"
        scipy.io.savemat(mat, arrays)
        assert_same_dataset(load_dataset("auto", mat), ds)
        folder = tmp_path / f"dir{ds.multilabel}"
        folder.mkdir()
        for key, value in arrays.items():
            np.save(folder / f"{key}.npy", value)
        assert_same_dataset(load_dataset("dir", folder), ds)


def test_generic_minimal_file_defaults(tmp_path):
    path = tmp_path / "minimal.npz"
    np.savez(path, img_train_x=np.ones((3, 2)), img_train_y=[0, 2, -1], txt_train_x=np.ones((2, 4)),
             txt_train_y=[1, 1], txt_test_x=np.zeros((1, 4)), txt_test_y=[0])
    ds = load_generic(path)
    assert ds.name == "minimal" and ds.modality_names == ["img", "txt"] and ds.class_names == ["0", "1", "2"]
    assert (ds["img"].val.n, ds["img"].test.n, ds["txt"].test.n) == (0, 0, 1)
    assert ds["img"].val.features.shape == (0, 2)


def test_generic_bad_input_names_file_key_modality(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, img_train_x=np.ones((3, 2)), img_train_y=[0, 1, 2], img_val_x=np.ones((1, 2)))
    with pytest.raises(KeyError, match=r"bad.npz: missing key 'img_val_y'; keys present: img_train_x, img_train_y, img_val_x"):
        load_generic(path)
    np.savez(path, features=np.ones((3, 2)))
    with pytest.raises(MissingKeyError, match=r"bad.npz: no keys of the form \{modality\}_\{split\}_x"):
        load_generic(path)
    np.savez(path, img_train_x=np.ones((3, 2)), img_train_y=[0, 1], class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"bad.npz: modality 'img', split 'train': features has 3 rows but labels has 2"):
        load_generic(path)
    np.savez(path, img_train_x=np.ones((3, 2)), img_train_y=[0, 1, 7], class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"bad.npz: modality 'img', split 'train': labels has class id 7"):
        load_generic(path)
    x = np.ones((3, 2))
    x[1, 0] = np.nan
    np.savez(path, img_train_x=x, img_train_y=[0, 1, 1])
    with pytest.raises(ValueError, match=r"bad.npz: modality 'img', split 'train': features contains NaN"):
        load_generic(path)


@pytest.mark.parametrize("name,fmt", [("junk.npz", "npz"), ("junk.h5", "h5"), ("junk.mat", "mat")])
def test_corrupt_files_raise_value_error_naming_the_file(tmp_path, name, fmt):
    path = tmp_path / name
    path.write_bytes(b"this is not a data file at all" * 20)
    with pytest.raises(ValueError, match=rf"cannot read .*{name} as a {fmt} file"):
        load_dataset(fmt, path)


def test_missing_files_raise_file_not_found(tmp_path):
    for name in ("npz", "h5", "mat", "wikipedia", "multiview-mat", "auto"):
        with pytest.raises(FileNotFoundError, match="absent.file"):
            load_dataset(name, tmp_path / "absent.file")


# --- real fixtures (read-only, never copied into the repository) ------------------------------


@pytest.fixture(scope="module")
def shared():
    root = os.environ.get("SDML_SHARED_DATA")
    if not root or not os.path.isdir(root):
        pytest.skip("SDML_SHARED_DATA not set: point it at the shared fixture folder "
                    "(holding msrc_v1/, bbcsport/, pascal_sentence_partial/) to run these tests")
    return root


def test_msrc_v1(shared):
    ds = load_dataset("multiview-mat", os.path.join(shared, "msrc_v1", "MSRC_v1.mat"))
    assert ds.num_classes == 7 and [m.dim for m in ds] == [24, 576, 512, 256, 254]
    for m in ds:
        assert m.train.n + m.val.n + m.test.n == 210
        for split in (m.train, m.val, m.test):
            assert np.isfinite(split.features).all()
            assert np.bincount(split.labels, minlength=7).min() >= 1  # 30 per class, stratified
        assert np.bincount(m.train.labels).tolist() == [18] * 7


def test_bbcsport_sparse_views(shared):
    ds = load_dataset("auto", os.path.join(shared, "bbcsport", "BBCSport.mat"))
    assert ds.num_classes == 5 and [m.dim for m in ds] == [3183, 3203]
    assert [m.train.n + m.val.n + m.test.n for m in ds] == [544, 544]
    assert all(m.train.features.dtype == np.float32 and m.train.features.flags.c_contiguous for m in ds)


def _pascal_partial(folder):
    """Test-only helper: the 100 paired test items of the partial Pascal Sentence fixture as a
    2-modality dataset (not a product format; its training images are missing)."""
    read = lambda name: scipy.io.loadmat(os.path.join(folder, name + ".mat"))[name]  # noqa: E731
    labels = read("test_img_lab").ravel()
    return split_paired_views("pascal_sentence_partial", {"image": read("test_img"), "text": read("test_txt")},
                              labels, [str(k) for k in range(20)])


def test_pascal_sentence_partial(shared):
    folder = os.path.join(shared, "pascal_sentence_partial")
    assert "test_img" in open(os.path.join(folder, "SOURCE.txt")).read()
    ds = _pascal_partial(folder)
    assert [m.dim for m in ds] == [4096, 300] and ds.num_classes == 20
    assert [(m.train.n, m.val.n, m.test.n) for m in ds] == [(60, 20, 20)] * 2
    assert np.bincount(ds["text"].test.labels, minlength=20).tolist() == [1] * 20
    assert ds["image"].val.labels.shape == (20,) and ds["image"].val.labelled.all()


# --- telling the layout from a file ------------------------------------------------------------


def test_detect_layout_of_every_readable_kind(tmp_path, small):
    """--data without --dataset: every layout the loaders read is recognised from its keys."""
    generic = tmp_path / "generic"
    generic.mkdir()
    save_npz(small, generic / "g.npz")
    arrays = to_arrays(small)
    with h5py.File(generic / "g.h5", "w") as f:
        for k, v in arrays.items():
            f[k] = v.astype("S") if v.dtype.kind == "U" else v
    scipy.io.savemat(generic / "g.mat", arrays)
    folder = generic / "npy"
    folder.mkdir()
    for k, v in arrays.items():
        np.save(folder / f"{k}.npy", v)
    assert [detect_layout(generic / n) for n in ("g.npz", "g.h5", "g.mat", "npy")] == ["npz", "h5", "mat", "dir"]
    for file in ("g.npz", "g.h5", "g.mat", "npy"):
        assert_same_dataset(load_dataset(None, generic / file), load_dataset(detect_layout(generic / file), generic / file))

    xmedia = tmp_path / "XMediaFeatures.mat"
    scipy.io.savemat(xmedia, xmedia_arrays())
    assert detect_layout(xmedia) == "xmedia"

    for name, rows in AUTHORS_H5_TEST_ROWS.items():  # told apart by the size of the test set
        path = tmp_path / f"{name}.h5"
        authors_h5(path, n_test=rows)
        assert detect_layout(path) == name
    wiki = load_dataset(None, tmp_path / "wikipedia.h5")
    assert wiki.name == "wikipedia" and wiki["image"].val.n == 231  # the published split
    odd = tmp_path / "odd.h5"
    authors_h5(odd, n_test=50)
    assert detect_layout(odd, n_val=5) == "authors-h5"

    views = tmp_path / "views.mat"
    scipy.io.savemat(views, {"fea": views_cell(np.ones((6, 2)), np.ones((6, 3))), "gt": np.arange(6) % 2})
    assert detect_layout(views) == "multiview-mat"


def test_detect_layout_unknown_names_the_candidates(tmp_path):
    path = tmp_path / "mystery.mat"
    scipy.io.savemat(path, {"features": np.ones((3, 2)), "labels": np.arange(3)})
    with pytest.raises(ValueError) as info:
        detect_layout(path)
    message = str(info.value)
    assert "mystery.mat: cannot tell the dataset layout from its keys (features, labels)" in message
    for candidate in ("generic layout", "XMedia", "Wikipedia / NUS-WIDE / MS-COCO HDF5", "fea + gt", "--dataset"):
        assert candidate in message
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        detect_layout(tmp_path / "absent.npz")
