"""sdml_ext.data: core types, stratified splits, the embedded UCI digits, the synthetic generator
and load_dataset's name handling. File formats are tested in test_data_formats.py."""

from importlib import resources

import numpy as np
import pytest

from sdml_ext.data import (
    DATASET_NAMES,
    MFEAT_VIEWS,
    Dataset,
    Modality,
    Split,
    load_dataset,
    load_mfeat,
    make_synthetic,
    stratified_split,
)


def _modality(name="a", n=(6, 2, 2), dim=3, labels=None, c=3):
    rng = np.random.default_rng(0)
    splits = []
    for k in n:
        y = np.arange(k) % c if labels is None else labels
        splits.append((rng.standard_normal((k, dim)), y))
    return Modality(name, *splits)


# --- core types ---------------------------------------------------------------------------


def test_split_converts_to_float32_c_contiguous_and_int64():
    x = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(4, 3))
    s = Split(x, np.array([0.0, 1.0, -1.0, 2.0]))
    assert s.features.dtype == np.float32 and s.features.flags.c_contiguous
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [0, 1, -1, 2]
    assert s.labelled.tolist() == [True, True, False, True]
    assert (s.n, s.dim, s.multilabel) == (4, 3, False)


def test_split_multi_hot_dtypes():
    assert Split(np.zeros((2, 3)), np.array([[True, False], [False, False]])).labels.dtype == np.uint8
    s = Split(np.zeros((2, 3)), np.array([[1.0, 0.0], [0.0, 0.0]]))
    assert s.labels.dtype == np.float32 and s.multilabel
    assert s.labelled.tolist() == [True, False]


def test_rows_mismatch_names_modality_split_and_arguments():
    with pytest.raises(ValueError, match=r"modality 'img', split 'val': features has 2 rows but labels has 3"):
        Modality("img", (np.zeros((4, 2)), np.zeros(4)), (np.zeros((2, 2)), np.zeros(3)), (np.zeros((1, 2)), [0]))


def test_nan_features_names_modality_split_and_position():
    x = np.zeros((4, 2))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"modality 'txt', split 'train': features contains NaN/Inf.*row 2, column 1"):
        Modality("txt", (x, np.zeros(4)), (np.zeros((0, 2)), np.zeros(0)), (np.zeros((0, 2)), np.zeros(0)))


def test_inf_and_float32_overflow_are_rejected():
    for bad in (np.inf, 1e300):
        x = np.ones((2, 2))
        x[0, 0] = bad
        with pytest.raises(ValueError, match="features contains NaN/Inf"):
            Split(x, [0, 1])


def test_labels_out_of_range_names_modality_split_and_id():
    m = _modality("img", labels=None)
    bad = Modality("txt", (np.zeros((3, 2)), [0, 1, 5]), (np.zeros((0, 2)), []), (np.zeros((0, 2)), []))
    with pytest.raises(ValueError, match=r"modality 'txt', split 'train': labels has class id 5 at row 2, outside \[-1, 3\)"):
        Dataset("d", [m, bad], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"split 'train': labels has class id -2 at row 0"):
        Modality("txt", (np.zeros((1, 2)), [-2]), (np.zeros((0, 2)), []), (np.zeros((0, 2)), []))


def test_multi_hot_width_must_match_classes():
    y = np.eye(4, dtype=np.uint8)
    m = Modality("img", (np.zeros((4, 2)), y), (np.zeros((0, 2)), y[:0]), (np.zeros((0, 2)), y[:0]))
    with pytest.raises(ValueError, match=r"modality 'img', split 'train': multi-hot labels have 4 columns but the dataset has 3"):
        Dataset("d", [m], ["a", "b", "c"])
    with pytest.raises(ValueError, match="only 0 and 1"):
        Split(np.zeros((1, 2)), np.array([[2, 0]]))


def test_dataset_structure_errors():
    m = _modality("a")
    with pytest.raises(ValueError, match="at least one modality"):
        Dataset("d", [], ["x"])
    with pytest.raises(ValueError, match=r"duplicate modality names \['a'\]"):
        Dataset("d", [m, _modality("a")], ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"modality 'a', split 'train': the train split is empty"):
        _modality("a", n=(0, 2, 2))
    with pytest.raises(ValueError, match=r"modality 'b', split 'test': features have 4 columns but the train split has 3"):
        Modality("b", (np.zeros((2, 3)), [0, 1]), (np.zeros((0, 3)), []), (np.zeros((1, 4)), [0]))
    with pytest.raises(ValueError, match="labels are class ids .* but the dataset expects multi-hot"):
        Dataset("d", [m], ["x", "y", "z"], multilabel=True)


def test_unpaired_sizes_and_describe():
    a = _modality("image", n=(6, 0, 3))
    b = _modality("text", n=(9, 2, 4), dim=5, labels=None)
    ds = Dataset("toy", [a, b], ["x", "y", "z"], source="unit test")
    assert not ds.multilabel and ds.num_classes == 3 and ds.modality_names == ["image", "text"]
    assert ds["text"].test.n == 4 and ds["image"].val.n == 0 and ds["text"].dim == 5
    text = ds.describe()
    assert "toy" in text and "image" in text and "text" in text and "unit test" in text
    with pytest.raises(ValueError, match="no modality 'audio'; present: image, text"):
        ds["audio"]


# --- stratified splits ----------------------------------------------------------------------


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    y = np.repeat(np.arange(4), [10, 20, 5, 3])
    train, val, test = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    again = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    for a, b in zip((train, val, test), again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(train, stratified_split(y, seed=4)[0])
    everything = np.concatenate([train, val, test])
    assert np.array_equal(np.sort(everything), np.arange(y.size))
    for part, expected in zip((train, val, test), ([6, 12, 3, 1], [2, 4, 1, 1], [2, 4, 1, 1])):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
        assert np.bincount(y[part], minlength=4).tolist() == expected


def test_stratified_split_small_classes_and_multilabel_fallback():
    train, val, test = stratified_split(np.array([0, 0, 1]), seed=0)
    assert sorted(np.concatenate([train, val, test]).tolist()) == [0, 1, 2]
    assert set(train.tolist()) >= {2}  # a singleton class stays in train
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 1], [0, 0], [1, 0]] * 5)
    parts = stratified_split(y, (0.5, 0.25, 0.25), seed=1)
    assert sum(p.size for p in parts) == y.shape[0]
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(np.zeros(4, int), (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="train > 0"):
        stratified_split(np.zeros(4, int), (0.0, 0.5, 0.5))


# --- embedded UCI digits --------------------------------------------------------------------

MFEAT_DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


@pytest.fixture(scope="module")
def mfeat():
    return load_mfeat()


def test_mfeat_shapes_classes_and_split(mfeat):
    assert mfeat.name == "mfeat" and not mfeat.multilabel
    assert mfeat.modality_names == list(MFEAT_VIEWS) == list(MFEAT_DIMS)
    assert mfeat.class_names == [str(d) for d in range(10)]
    assert "CC BY 4.0" in mfeat.source and "van Breukelen" in mfeat.source
    for m in mfeat:
        assert m.dim == MFEAT_DIMS[m.name]
        assert (m.train.n, m.val.n, m.test.n) == (1200, 400, 400)
        for split, per_class in ((m.train, 120), (m.val, 40), (m.test, 40)):
            assert split.features.dtype == np.float32 and np.isfinite(split.features).all()
            assert np.bincount(split.labels, minlength=10).tolist() == [per_class] * 10


def test_mfeat_uses_the_same_rows_for_every_view_and_exact_values(mfeat):
    with resources.files("sdml_ext.data").joinpath("mfeat.npz").open("rb") as f, np.load(f) as raw:
        raw = {k: raw[k] for k in raw.files}
    labels = raw["labels"]
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 200))
    parts = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    for m in mfeat:
        for split, idx in zip((m.train, m.val, m.test), parts):
            np.testing.assert_array_equal(split.features, raw[m.name][idx].astype(np.float32))
            np.testing.assert_array_equal(split.labels, labels[idx])
    # First row of the published CSVs (digit 0).
    assert raw["fou"][0, :2].tolist() == [np.float32(0.065882), np.float32(0.19731)]
    assert raw["fac"][0, :3].tolist() == [98, 236, 531]
    assert raw["kar"][0, 0] == np.float32(-10.297)
    assert raw["mor"][0].tolist() == [1, 0, 0, np.float32(133.15), np.float32(1.3117), np.float32(1620.2)]


def test_mfeat_split_is_seeded_and_license_ships(mfeat):
    other = load_mfeat(seed=1, views=("pix", "fou"))
    assert other.modality_names == ["pix", "fou"]
    assert not np.array_equal(other["fou"].train.features, mfeat["fou"].train.features)
    np.testing.assert_array_equal(load_mfeat(views=("fou",))["fou"].test.features, mfeat["fou"].test.features)
    text = resources.files("sdml_ext.data").joinpath("MFEAT_LICENSE.txt").read_text()
    assert "CC BY 4.0" in text and "van Breukelen" in text
    with pytest.raises(ValueError, match="views must be distinct names"):
        load_mfeat(views=("fou", "abc"))


# --- synthetic ------------------------------------------------------------------------------


def test_synthetic_shapes_and_determinism():
    sizes = dict(n_modalities=3, dims=(20, 12, 7), n_classes=4, n_val=5, n_test=(8, 6, 4), seed=7)
    ds = make_synthetic(n_train=(30, 20, 10), **sizes)
    assert ds.modality_names == ["m0", "m1", "m2"] and ds.num_classes == 4
    assert [m.dim for m in ds] == [20, 12, 7]
    assert [(m.train.n, m.val.n, m.test.n) for m in ds] == [(30, 5, 8), (20, 5, 6), (10, 5, 4)]
    assert np.bincount(ds["m0"].train.labels).tolist() == [8, 8, 7, 7]
    same = make_synthetic(n_train=(30, 20, 10), **sizes)
    for a, b in zip(ds, same):
        np.testing.assert_array_equal(a.train.features, b.train.features)
        np.testing.assert_array_equal(a.test.labels, b.test.labels)
    other = make_synthetic(n_train=(30, 20, 10), **dict(sizes, seed=8))
    assert not np.array_equal(other["m0"].train.features, ds["m0"].train.features)
    # Each modality has its own random stream: resizing m1 leaves m0 untouched.
    resized = make_synthetic(n_train=(30, 99, 10), **sizes)
    np.testing.assert_array_equal(resized["m0"].train.features, ds["m0"].train.features)


def test_synthetic_is_class_structured():
    ds = make_synthetic(n_classes=5, noise=0.3, seed=0)
    m = ds["m0"]
    centroids = np.stack([m.train.features[m.train.labels == k].mean(0) for k in range(5)])
    distances = ((m.test.features[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == m.test.labels).mean() > 0.9


def test_synthetic_multilabel_with_unlabelled_rows():
    ds = make_synthetic(n_classes=6, multilabel=True, max_labels=2, unlabelled=0.25, n_train=40, seed=1)
    assert ds.multilabel
    train = ds["m1"].train
    assert train.labels.shape == (40, 6) and train.labels.dtype == np.uint8
    counts = train.labels.sum(1)
    assert (counts == 0).sum() == 10 and counts.max() <= 2
    assert ds["m1"].test.labels.sum(1).min() >= 1
    single = make_synthetic(unlabelled=0.5, n_train=10)
    assert (single["m0"].train.labels == -1).sum() == 5
    with pytest.raises(ValueError, match="dims must be one int or 3 ints"):
        make_synthetic(dims=(4, 5))


# --- load_dataset names ---------------------------------------------------------------------


def test_load_dataset_builtin_names(mfeat):
    ds = load_dataset("MFEAT")
    np.testing.assert_array_equal(ds["zer"].val.features, mfeat["zer"].val.features)
    assert load_dataset("synthetic", n_modalities=2).modality_names == ["m0", "m1"]


def test_load_dataset_name_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset name 'imagenet'; valid names: mfeat, synthetic, xmedia"):
        load_dataset("imagenet")
    assert "wikipedia" in DATASET_NAMES and "multiview-mat" in DATASET_NAMES
    with pytest.raises(ValueError, match="'xmedia' needs a path"):
        load_dataset("xmedia")
    with pytest.raises(ValueError, match="takes no path"):
        load_dataset("mfeat", path=str(tmp_path))
    missing = tmp_path / "nope.mat"
    with pytest.raises(FileNotFoundError, match="nope.mat"):
        load_dataset("xmedia", missing)
    odd = tmp_path / "data.csv"
    odd.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"data.csv: cannot tell the format from the extension '.csv'"):
        load_dataset(None, odd)
