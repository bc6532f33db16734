"""Every .npy and .npz the command lines read is checked against its header before anything is
allocated: a header (or a zip directory) that declares far more data than the file holds is one
line naming the file, exit status 2, never a MemoryError or an allocation of the declared size."""

import shutil
import struct
import zipfile

import numpy as np
import pytest

from helpers import run_main
from runs import one_error_line, search, train
from sdml_ext.cli import evaluate as evaluate_cli

HUGE = (10**9, 10**6)  # float32: 3.6 PiB declared


def npy_header(stream, shape, dtype=np.float32) -> None:
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, dtype))
    header["shape"] = shape
    np.lib.format.write_array_header_1_0(stream, header)


def huge_npy(path, shape=HUGE, dtype=np.float32):
    """A .npy whose header declares `shape` and which holds 16 bytes of data."""
    with open(path, "wb") as f:
        npy_header(f, shape, dtype)
        f.write(bytes(16))
    return path


def huge_npz(path, key, source=None):
    """An .npz (a copy of `source`'s members, if given) whose member `key` declares HUGE."""
    with zipfile.ZipFile(path, "w") as z:
        if source is not None:
            with zipfile.ZipFile(source) as old:
                for name in old.namelist():
                    if name != f"{key}.npy":
                        z.writestr(name, old.read(name))
        with z.open(f"{key}.npy", "w") as member:
            npy_header(member, HUGE)
            member.write(bytes(16))
    return path


def lying_npz(path, key="x"):
    """An .npz whose member `key` declares 1e9 float32 (4 GB), and whose zip directory records
    ~4 GiB for it, though it holds a few compressed bytes: each size agrees with the other, and
    only the compressed size gives the lie away."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open(f"{key}.npy", "w") as member:
            npy_header(member, (10**9,))
            member.write(bytes(16))
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.find(b"PK\x03\x04") + 22, 0xFFFFFFF0)  # local header: size
    struct.pack_into("<I", data, data.rfind(b"PK\x01\x02") + 24, 0xFFFFFFF0)  # central directory: size
    path.write_bytes(bytes(data))
    return path


def assert_refused(code, err, *words):
    line = one_error_line(err)
    assert code == 2 and "MemoryError" not in err, err
    for word in words:
        assert word in line, line
    return line


RUN = ["--config", "small.toml", "--data", "good3.npz", "--out", "r"]


def test_search_query_features_npy(index, work, capsys):
    huge_npy(work / "q.npy")
    code, _, err = search(["query", "idx", "--modality", "m1", "--features", "q.npy"], capsys)
    assert_refused(code, err, "--features q.npy", "declares")


def test_search_build_features_npy(work, capsys):
    huge_npy(work / "g.npy")
    code, _, err = search(["build", "B", "--modality", "m0", "--features", "g.npy", "--out", "i"], capsys)
    assert_refused(code, err, "--features g.npy", "declares")
    assert not (work / "i").exists()


def test_search_build_features_in_a_directory_of_npy(work, capsys):
    (work / "g").mkdir()
    huge_npy(work / "g" / "x.npy")
    code, _, err = search(["build", "B", "--modality", "m0", "--features", "g", "--out", "i"], capsys)
    assert_refused(code, err, "'x'", "g", "declares")


def test_search_build_ids_npy(work, capsys):
    huge_npy(work / "ids.npy", shape=(10**12,), dtype=np.int64)
    code, _, err = search(["build", "B", "--modality", "m0", "--features", "good3.npz", "--ids", "ids.npy",
                           "--out", "i"], capsys)
    assert_refused(code, err, "--ids ids.npy", "declares")
    assert not (work / "i").exists()


def test_search_features_npz_member_whose_zip_size_lies(index, work, capsys):
    lying_npz(work / "q.npz")
    code, _, err = search(["query", "idx", "--modality", "m1", "--features", "q.npz"], capsys)
    assert_refused(code, err, "q.npz", "'x'", "compressed bytes")


@pytest.mark.parametrize("make,word", [
    (lambda work: huge_npy(work / "P.npy"), "declares"),
    (lambda work: huge_npz(work / "P.npz", "P"), "declares"),
    (lambda work: lying_npz(work / "P.npz", "P"), "compressed bytes"),
], ids=["npy", "npz", "npz-lying-zip"])
def test_train_projection(work, capsys, make, word):
    path = make(work)
    code, _, err = train([*RUN, "--projection", path.name], capsys)
    assert_refused(code, err, str(path), word)
    assert not (work / "r").exists() and not (work / "r.partial").exists()


def test_train_dataset_npz_member(work, capsys):
    huge_npz(work / "bad.npz", "m1_train_x", source=work / "good3.npz")
    code, _, err = train(["--config", "small.toml", "--data", "bad.npz", "--out", "r"], capsys)
    assert_refused(code, err, "'m1_train_x'", "bad.npz", "declares")
    assert not (work / "r").exists() and not (work / "r.partial").exists()


def test_evaluate_dataset_npz_member(work, capsys):
    huge_npz(work / "bad.npz", "m0_test_x", source=work / "good3.npz")
    code, _, err = run_main(evaluate_cli.main, ["B", "--data", "bad.npz"], capsys)
    assert_refused(code, err, "'m0_test_x'", "bad.npz", "declares")


def test_a_well_formed_npz_and_npy_still_read(index, work, capsys):
    """The checks refuse only lies: the same arrays written by numpy (stored or compressed) read."""
    with np.load(work / "good3.npz") as data:
        arrays = {k: data[k] for k in data.files}
    np.savez_compressed(work / "c.npz", **arrays)
    np.save(work / "q.npy", arrays["m1_test_x"])
    shutil.copy(work / "good3.npz", work / "s.npz")
    for features in ("c.npz", "q.npy", "s.npz"):
        code, out, err = search(["query", "idx", "--modality", "m1", "--features", features, "-k", "2"], capsys)
        assert code == 0 and out.count("\n") == 1 + 2 * 60, err
