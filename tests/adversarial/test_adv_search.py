"""The search tools trust an index, a features file and their options only after checking them:
shards never followed out of the index, crafted id offsets, 0-d or huge-declared features,
faiss options out of range, features whose codes vanish; each one line, exit status 2."""

import json
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from runs import one_error_line, search
from sdml_ext.store.files import sha256_file


def query(capsys, *extra):
    return search(["query", "idx", "--modality", "m1", "--features", "good3.npz", "-k", "3", *extra], capsys)


def test_a_shard_linked_out_of_the_index_is_refused(index, work, capsys):
    shard = sorted(index.glob("*.safetensors"))[0]
    outside = work / shard.name
    shard.rename(outside)
    shard.symlink_to(outside)
    code, _, err = query(capsys)
    assert code == 2 and "symbolic link" in one_error_line(err)


def test_crafted_id_offsets_are_refused(index, capsys):
    manifest = json.loads((index / "index.json").read_text())
    file = index / manifest["shards"][0]["file"]
    arrays = load_file(str(file))
    arrays["id_offsets"] = arrays["id_offsets"][::-1].copy()  # falling offsets, checksum updated below
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    save_file(arrays, str(file), metadata=meta)
    manifest["shards"][0]["sha256"] = sha256_file(file)
    (index / "index.json").write_text(json.dumps(manifest))
    code, _, err = query(capsys)
    assert code == 2 and "id_offsets" in one_error_line(err)


def test_0d_features_are_one_line(index, work, capsys):
    np.savez(work / "s.npz", x=np.float32(3.0))
    code, _, err = search(["query", "idx", "--modality", "m1", "--features", "s.npz"], capsys)
    assert code == 2 and "shape" in one_error_line(err)


def test_a_header_declaring_a_huge_array_is_refused_before_allocating(index, work, capsys):
    with zipfile.ZipFile(work / "huge.npz", "w") as z:
        with z.open("x.npy", "w") as member:
            header = np.lib.format.header_data_from_array_1_0(np.zeros((2, 2), np.float32))
            header["shape"] = (200_000_000, 200)  # 149 GiB declared, 16 bytes present
            np.lib.format.write_array_header_1_0(member, header)
            member.write(np.zeros(4, np.float32).tobytes())
    code, _, err = search(["query", "idx", "--modality", "m1", "--features", "huge.npz"], capsys)
    line = one_error_line(err)
    assert code == 2 and "declares" in line and "x" in line


@pytest.mark.parametrize("flags,word", [
    (["--nprobe", "-5"], "--nprobe"), (["--nprobe", "0"], "--nprobe"), (["--nlist", "0"], "--nlist"),
    (["--kind", "hnsw", "--nlist", "8"], "hnsw"),
])
def test_faiss_options_out_of_range_are_one_line(index, work, capsys, flags, word):
    code, _, err = search(["export-faiss", "idx", "--out", "f.faiss", *flags], capsys)
    assert code == 2 and word in one_error_line(err)
    assert not (work / "f.faiss").exists()


def test_features_that_encode_to_a_zero_code_are_refused_at_build(work, capsys):
    x = np.ones((10, np.load("good3.npz")["m0_train_x"].shape[1]), np.float32)
    x[7] = 1e20
    np.save(work / "big.npy", x)
    code, _, err = search(["build", "B", "--modality", "m0", "--features", "big.npy", "--out", "idx2"], capsys)
    line = one_error_line(err)
    assert code == 2 and "row 7" in line
    assert not (work / "idx2").exists()
