"""Small data files in every layout the loaders read, written for the data tests: XMedia
(.mat v5 and MATLAB -v7.3 HDF5), the authors' HDF5, multi-view cells, the generic layout (with
keys made unreadable on purpose), and a comparison of two loaded datasets."""

from __future__ import annotations

import zipfile

import h5py
import numpy as np
import scipy.io
import scipy.sparse

from sdml_ext.data import Dataset


XMEDIA = {  # modality: keys, feature width, train rows, test rows
    "image": (("I_tr_CNN", "I_te_CNN", "trImgCat", "teImgCat"), 6, 8, 6),
    "text": (("T_tr_BOW", "T_te_BOW", "trTxtCat", "teTxtCat"), 5, 7, 4),
    "audio": (("A_tr", "A_te", "trAudCat", "teAudCat"), 3, 5, 2),
    "3d": (("d3_tr", "d3_te", "tr3dCat", "te3dCat"), 4, 4, 2),
    "video": (("V_tr_CNN", "V_te_CNN", "trVidCat", "teVidCat"), 6, 6, 3),
}

def xmedia_arrays(c=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for keys, dim, n_tr, n_te in XMEDIA.values():
        arrays[keys[0]] = rng.standard_normal((n_tr, dim))
        arrays[keys[1]] = rng.standard_normal((n_te, dim))
        arrays[keys[2]] = (np.arange(n_tr) % c + 1).reshape(-1, 1).astype(float)  # 1-based column
        arrays[keys[3]] = (np.arange(n_te) % c + 1).reshape(-1, 1).astype(float)
    return arrays

def write_matlab_v73(path, arrays):
    """Mimic MATLAB -v7.3: HDF5 with a 512-byte user block, column-major (transposed) arrays,
    MATLAB_class attributes, cells as object references, sparse as data/ir/jc groups."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")

        def put(group, name, value):
            if scipy.sparse.issparse(value):
                csc = scipy.sparse.csc_matrix(value)
                g = group.create_group(name)
                g.attrs["MATLAB_class"] = np.bytes_("double")
                g.attrs["MATLAB_sparse"] = np.uint64(csc.shape[0])
                g["data"], g["ir"], g["jc"] = csc.data, csc.indices.astype(np.uint64), csc.indptr.astype(np.uint64)
            elif isinstance(value, np.ndarray) and value.dtype == object:
                ref_array = np.empty(value.shape[::-1], dtype=h5py.ref_dtype)
                for i, cell in enumerate(value.reshape(-1)):
                    put(refs, f"cell{name}{i}", cell)
                    ref_array.reshape(-1)[i] = refs[f"cell{name}{i}"].ref
                group.create_dataset(name, data=ref_array).attrs["MATLAB_class"] = np.bytes_("cell")
            else:
                value = np.atleast_2d(value)
                group.create_dataset(name, data=value.T).attrs["MATLAB_class"] = np.bytes_("double")

        for name, value in arrays.items():
            put(f, name, value)

def authors_h5(path, n_train=12, n_test=240, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    labels = labels or (lambda n: (np.arange(n) % 10 + 1).reshape(-1, 1))  # 1-based, (n, 1)
    with h5py.File(path, "w") as f:
        f["train_imgs_deep"] = rng.standard_normal((n_train, 8)).astype(np.float32)
        f["train_imgs_labels"] = labels(n_train)
        f["train_text"] = rng.standard_normal((n_train + 3, 5)).astype(np.float32)
        f["train_texts_labels"] = labels(n_train + 3)
        f["test_imgs_deep"] = rng.standard_normal((n_test, 8)).astype(np.float32)
        f["test_imgs_labels"] = labels(n_test)
        f["test_text"] = rng.standard_normal((n_test, 5)).astype(np.float32)
        f["test_texts_labels"] = labels(n_test)

def views_cell(*views):
    cell = np.empty((1, len(views)), dtype=object)
    for i, v in enumerate(views):
        cell[0, i] = v
    return cell

def assert_same_dataset(a: Dataset, b: Dataset):
    assert (a.name, a.modality_names, a.class_names, a.multilabel, a.source) == (
        b.name, b.modality_names, b.class_names, b.multilabel, b.source)
    for ma, mb in zip(a, b):
        for (name, sa), (_, sb) in zip(ma.splits(), mb.splits()):
            np.testing.assert_array_equal(sa.features, sb.features, err_msg=f"{ma.name} {name}")
            np.testing.assert_array_equal(sa.labels, sb.labels, err_msg=f"{ma.name} {name}")
            assert sa.labels.shape == sb.labels.shape


def write_generic(fmt, path, arrays, unreadable=()):
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
