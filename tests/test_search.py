"""sdml_ext.search: index round trip, exact search against a numpy reference (ties by gallery row),
sharded == unsharded, streaming build from a memory map, P@k / mAP against the ops, faiss export
recall, bad input, and the command line end to end."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import sdml_ext
from sdml_ext import cli
from safetensors.numpy import save_file

from sdml_ext.store.bundle import save_bundle
from sdml_ext.store.files import sha256_file
from sdml_ext.data import make_synthetic, save_npz
from sdml_ext.eval.metrics import mean_average_precision
from sdml_ext.model import make_projection
from sdml_ext.ops import precision_at_k
from sdml_ext.search import (
    IndexWriter,
    InputTypeError,
    SearchIndexError,
    build_index,
    hit_quality,
    load_index,
    read_index_manifest,
)
from sdml_ext.cli import search as search_cli
from sdml_ext.search.index import source_of
from sdml_ext.engine.strategies import train_tasks
from sdml_ext.engine.training import TrainOptions, make_tasks

from helpers import DEVICES
import retrieval_reference as ref

OPTS = TrainOptions(hidden=(32, 32), code_dim=16, batch_size=50, epochs=2, seed=7)
D = OPTS.code_dim


@pytest.fixture(scope="module")
def trained():
    ds = make_synthetic(3, n_train=100, n_val=20, n_test=60, n_classes=4, seed=3)
    P = make_projection(D, 4, OPTS.seed)
    report = train_tasks(make_tasks(list(ds), P, OPTS), "serial")
    return ds, P, report


def _save(path, trained, P=None, results=None):
    ds, P0, report = trained
    return save_bundle(path, P=P0 if P is None else P, projection_seed=OPTS.seed,
                       results=report.modalities if results is None else results, class_names=ds.class_names,
                       dataset={"name": ds.name}, config={}, run=report.summary())


@pytest.fixture(scope="module")
def bundle_path(trained, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("bundle") / "b", trained)


@pytest.fixture(scope="module")
def ds(trained):
    return trained[0]


@pytest.fixture
def bundle(bundle_path):
    return sdml_ext.load(bundle_path)


def tied_codes(n, seed, d=D):
    """Rows with four entries +-1 (scaled by powers of two): normalised entries are +-0.5, so every
    cosine is an exact multiple of 1/4 in any summation order and ties are massive and exact; a
    quarter of the rows repeat earlier rows (duplicate items)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, d)
    for i in range(n):
        x[i, torch.randperm(d, generator=gen)[:4]] = torch.randint(0, 2, (4,), generator=gen).float() * 2 - 1
    dup = torch.randperm(n, generator=gen)[: n // 4]
    x[dup] = x[torch.randint(0, n, (dup.numel(),), generator=gen)]
    return x * 2.0 ** torch.randint(-3, 4, (n, 1), generator=gen).float()


def write_codes(path, bundle, codes, shard_rows, ids=None, labels=None):
    id_kind = "position" if ids is None else "int" if np.asarray(ids).dtype.kind == "i" else "str"
    label_kind = None if labels is None else "class_ids"
    with IndexWriter(path, source_of(bundle, "m0"), D, shard_rows=shard_rows, id_kind=id_kind,
                     label_kind=label_kind) as writer:
        for start in range(0, codes.shape[0], 5):  # appends that straddle shard boundaries
            cut = slice(start, start + 5)
            writer.append(codes[cut], None if ids is None else np.asarray(ids)[cut],
                          None if labels is None else labels[cut])
    return path


def reference_topk(q, g, k):
    """Brute force in float64 numpy: descending cosine, ties by ascending gallery row."""
    scores = ref.cosine_scores(q, g)
    return ref.topk(scores, k)


# ---- exact search ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_rows", [1, 7, 50, 103])
@pytest.mark.parametrize("block_rows", [1, 9, None])
def test_search_equals_numpy_reference_with_ties(tmp_path, bundle, shard_rows, block_rows):
    g = tied_codes(103, seed=1)
    q = tied_codes(17, seed=2)
    index = load_index(write_codes(tmp_path / "i", bundle, g, shard_rows), bundle, block_rows=block_rows)
    for k in (1, 6, 103):
        top = index.search_codes(q, k)
        want_scores, want_rows = reference_topk(q, g, k)
        assert np.array_equal(top.indices.numpy(), want_rows)
        assert np.array_equal(top.scores.double().numpy(), want_scores)
        assert top.scores.dtype == torch.float32 and top.indices.dtype == torch.int64


def test_duplicate_rows_come_back_in_row_order(tmp_path, bundle):
    g = torch.randn(10, D)
    g[[2, 5, 9]] = g[7].clone()  # four copies of one item, in different shards and blocks
    index = load_index(write_codes(tmp_path / "i", bundle, g, shard_rows=3), bundle, block_rows=2)
    top = index.search_codes(g[7:8] * 3.0, 4)
    assert top.indices.tolist() == [[2, 5, 7, 9]]
    assert len(set(top.scores[0].tolist())) == 1
    none = index.search_codes(torch.zeros(0, D), 3)
    assert none.indices.shape == none.scores.shape == (0, 3) and index.ids_of(none.indices).shape == (0, 3)


@pytest.mark.parametrize("shard_rows", [1, 13, 64, 500])
def test_sharded_equals_unsharded(tmp_path, bundle, shard_rows):
    gen = torch.Generator().manual_seed(3)
    g, q = torch.randn(211, D, generator=gen), torch.randn(23, D, generator=gen)
    whole = load_index(write_codes(tmp_path / "whole", bundle, g, shard_rows=10_000), bundle, block_rows=40)
    sharded = load_index(write_codes(tmp_path / "sharded", bundle, g, shard_rows=shard_rows), bundle, block_rows=40)
    in_memory = load_index(tmp_path / "sharded", bundle, block_rows=40, in_memory=True)
    assert len(read_index_manifest(tmp_path / "sharded")["shards"]) == -(-211 // shard_rows)
    a, b, c = whole.search_codes(q, 25), sharded.search_codes(q, 25), in_memory.search_codes(q, 25)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.indices, c.indices) and torch.equal(a.scores, c.scores)
    # And the float32 result is the float64 reference up to rounding.
    want_scores, _ = reference_topk(q, g, 25)
    np.testing.assert_allclose(a.scores.double().numpy(), want_scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.take_along_axis(ref.cosine_scores(q, g), a.indices.numpy(), 1), want_scores,
                               atol=1e-5, rtol=0)


def test_float16_storage_is_float32_search_of_the_rounded_codes(tmp_path, bundle, ds):
    gen = torch.Generator().manual_seed(4)
    g, q = torch.randn(150, D, generator=gen), torch.randn(12, D, generator=gen)
    rounded = torch.nn.functional.normalize(g, dim=1).half().float()
    with IndexWriter(tmp_path / "f32", source_of(bundle, "m0"), D, shard_rows=40) as writer:
        writer.append(rounded, normalized=True)
    with IndexWriter(tmp_path / "f16", source_of(bundle, "m0"), D, shard_rows=40, dtype="float16") as writer:
        writer.append(g)
    half, full = load_index(tmp_path / "f16", bundle, block_rows=33), load_index(tmp_path / "f32", bundle, block_rows=33)
    a, b = half.search_codes(q, 20), full.search_codes(q, 20)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    size = lambda p: sum(f.stat().st_size for f in p.glob("shard-*"))  # noqa: E731
    assert size(tmp_path / "f16") < 0.6 * size(tmp_path / "f32")
    assert read_index_manifest(tmp_path / "f16")["dtype"] == "float16"
    # Built from features too; the reloaded in-memory index searches the same.
    built = build_index(bundle, "m0", ds["m0"].test.features, path=tmp_path / "built", dtype="float16")
    again = load_index(tmp_path / "built", bundle, in_memory=True)
    x = ds["m1"].test.features
    assert torch.equal(built.search(x, 5, modality="m1").ids, again.search(x, 5, modality="m1").ids)
    with pytest.raises(ValueError, match="dtype must be one of float32, float16"):
        build_index(bundle, "m0", ds["m0"].test.features, path=tmp_path / "bad", dtype="int8")


# ---- build, save, load ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_with_string_ids(tmp_path, bundle_path, ds, device):
    bundle = sdml_ext.load(bundle_path, device)
    g, q = ds["m0"].test, ds["m1"].test
    names = [f"item-{i}-é" for i in range(g.n)]
    index = build_index(bundle, "m0", g.features, ids=names, labels=g.labels)
    assert index.in_memory and index.n == g.n and index.d == D
    assert index.codes().device.type == torch.device(device).type
    scores, ids = index.search(q.features, 7, modality="m1")
    assert scores.shape == (q.n, 7) and ids.shape == (q.n, 7) and ids.dtype.kind == "U"

    # Against encoding by hand and the plain op on the CPU: the same rows (on CUDA the same scores
    # up to rounding, which may swap near-ties), mapped to the given ids.
    codes = torch.nn.functional.normalize(bundle.encode("m0", g.features), dim=1)
    plain = sdml_ext.ops.cosine_topk(bundle.encode("m1", q.features), codes, 7)
    if device == "cpu":
        assert ids.tolist() == [[names[r] for r in row] for row in plain.indices.tolist()]
    np.testing.assert_allclose(scores.numpy(), plain.scores.numpy(), atol=1e-5, rtol=0)

    saved = index.save(tmp_path / "idx", shard_rows=11)
    assert sorted(os.listdir(saved))[:2] == ["index.json", "shard-00000.safetensors"]
    for loaded in (load_index(saved, bundle), load_index(saved, bundle, in_memory=True)):
        s2, i2 = loaded.search(q.features, 7, modality="m1")
        assert torch.equal(s2, scores) and i2.tolist() == ids.tolist()
        assert torch.equal(loaded.labels_of(torch.arange(g.n)), torch.as_tensor(g.labels))
    # The index opens its recorded bundle when none is given.
    assert load_index(saved).source["bundle"] == str(bundle_path)


def test_streaming_build_from_a_memory_map_equals_in_memory(tmp_path, bundle, ds):
    g, q = ds["m0"].test, ds["m2"].test
    np.save(tmp_path / "g.npy", g.features)
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    ids = np.arange(1000, 1000 + g.n) * 7
    on_disk = build_index(bundle, "m0", mapped, ids=ids, labels=g.labels, path=tmp_path / "idx", shard_rows=8,
                          block_rows=5)
    assert not on_disk.in_memory and len(read_index_manifest(tmp_path / "idx")["shards"]) == -(-g.n // 8)
    in_memory = build_index(bundle, "m0", g.features, ids=ids, labels=g.labels, block_rows=5)
    a, b = on_disk.search(q.features, 9, modality="m2"), in_memory.search(q.features, 9, modality="m2")
    assert torch.equal(a.scores, b.scores) and torch.equal(a.ids, b.ids) and a.ids.dtype == torch.int64
    assert set(a.ids.flatten().tolist()) <= set(ids.tolist())
    # No temporary directory is left next to the index.
    assert sorted(os.listdir(tmp_path)) == ["g.npy", "idx"]


@pytest.mark.parametrize("multilabel", [False, True])
def test_hit_quality_equals_the_ranking_ops(bundle, ds, multilabel):
    g, q = ds["m0"].test, ds["m1"].test
    gl, ql = torch.as_tensor(g.labels), torch.as_tensor(q.labels)
    if multilabel:  # two-hot rows sharing classes
        gl = torch.nn.functional.one_hot(gl.clamp(min=0), 4) | torch.nn.functional.one_hot((gl + 1) % 4, 4)
        ql = torch.nn.functional.one_hot(ql.clamp(min=0), 4)
    index = build_index(bundle, "m0", g.features, labels=gl, block_rows=13)
    gc, qc = index.codes(), index.encode(q.features, "m1")
    for k in (1, 10, g.n):
        quality = hit_quality(index, index.search_codes(qc, k), ql)
        assert quality["queries"] == q.n and quality["k"] == k
        assert quality["map_at_k"] == pytest.approx(mean_average_precision(qc, gc, ql, gl, k), abs=1e-12)
        want_p = float(precision_at_k(qc, gc, ql, gl, [k]).mean())
        assert quality["precision_at_k"] == pytest.approx(want_p, abs=1e-12)


# ---- faiss ----------------------------------------------------------------------------------------


def test_faiss_export_recall(tmp_path, bundle):
    faiss = pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu, the bench extra)")
    from sdml_ext.search import export_faiss, to_faiss

    gen = torch.Generator().manual_seed(5)
    centers = torch.randn(40, D, generator=gen)
    g = centers[torch.randint(0, 40, (4000,), generator=gen)] + 0.4 * torch.randn(4000, D, generator=gen)
    q = centers[torch.randint(0, 40, (200,), generator=gen)] + 0.4 * torch.randn(200, D, generator=gen)
    index = load_index(write_codes(tmp_path / "i", bundle, g, shard_rows=1500), bundle, block_rows=1000)
    k = 10
    exact = index.search_codes(q, k).indices.numpy()
    qn = torch.nn.functional.normalize(q, dim=1).numpy()

    def recall(found):
        return np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)])

    ivf = to_faiss(index, "ivf")
    ivf.nprobe = ivf.nlist  # every list: exact up to float rounding
    assert recall(ivf.search(qn, k)[1]) >= 0.99
    ivf.nprobe = max(1, ivf.nlist // 16)  # the default
    assert recall(ivf.search(qn, k)[1]) >= 0.8
    hnsw = to_faiss(index, "hnsw")
    assert recall(hnsw.search(qn, k)[1]) >= 0.95
    path = export_faiss(index, tmp_path / "g.faiss", "hnsw")
    assert np.array_equal(faiss.read_index(str(path)).search(qn, k)[1], hnsw.search(qn, k)[1])
    with pytest.raises(FileExistsError, match="already exists"):
        export_faiss(index, path, "hnsw")


# ---- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def small_index(tmp_path, bundle, ds):
    g = ds["m0"].test
    return build_index(bundle, "m0", g.features, labels=g.labels, path=tmp_path / "idx", shard_rows=25)


def test_bad_queries(small_index, ds):
    x = ds["m1"].test.features
    cases = [
        (lambda: small_index.search(x, 3, modality="nope"), ValueError, "no modality 'nope'"),
        (lambda: small_index.search(x[:, :5], 3, modality="m1"), ValueError, r"expects features of shape \[n, 48\]"),
        (lambda: small_index.search(x, 61, modality="m1"), ValueError, r"k must be in \[1, 60\]"),
        (lambda: small_index.search(x, 0, modality="m1"), ValueError, r"k must be in \[1, 60\]"),
        (lambda: small_index.search(x, 2.0, modality="m1"), TypeError, "k must be an int"),
        (lambda: small_index.search(x[0], 3, modality="m1"), ValueError, "must be 2-D"),
        (lambda: small_index.search(torch.tensor(x, requires_grad=True), 3, modality="m1"), ValueError, "requires grad"),
        (lambda: small_index.search(x.astype(str), 3, modality="m1"), TypeError, "real numbers"),
        (lambda: small_index.search(x.astype(np.complex64), 3, modality="m1"), TypeError, "real numbers"),
        (lambda: small_index.search(np.where(np.arange(48) == 3, np.nan, x), 3, modality="m1"), ValueError, "NaN"),
        (lambda: small_index.search_codes(torch.randn(2, D + 1), 3), ValueError, r"codes must be \[nq, 16\]"),
        (lambda: small_index.search_codes(torch.full((2, D), float("inf")), 3), ValueError, "NaN or Inf"),
        (lambda: small_index.search_codes(torch.randn(2, D, requires_grad=True), 3), ValueError, "requires grad"),
        (lambda: hit_quality(small_index, small_index.search_codes(torch.randn(2, D), 3), np.zeros((2, 4))),
         ValueError, "query labels are multi_hot"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert issubclass(InputTypeError, ValueError)  # the command line reports it in one line


def test_bad_galleries(tmp_path, bundle, ds):
    x, y = ds["m0"].test.features, ds["m0"].test.labels
    bad_nan = x.copy()
    bad_nan[-1, 0] = np.nan
    cases = [
        (dict(modality="nope"), ValueError, "no modality 'nope'"),
        (dict(features=x[:0]), ValueError, "gallery is empty"),
        (dict(features=x[:, 1:]), ValueError, r"expects features of shape \[n, 64\]"),
        (dict(features=torch.tensor(x, requires_grad=True)), ValueError, "requires grad"),
        (dict(features=x.astype(object)), TypeError, "real numbers"),
        (dict(ids=list(range(5))), ValueError, "ids must be a sequence of 60"),
        (dict(ids=[1.5] * 60), TypeError, "all integers or all strings"),
        (dict(labels=y[:5]), ValueError, "labels must be"),
        (dict(labels=np.full(60, -2)), ValueError, ">= -1"),
        (dict(block_rows=0), ValueError, "block_rows must be >= 1"),
        (dict(features=bad_nan, block_rows=7), ValueError, "NaN"),
    ]
    for options, error, message in cases:
        kwargs = dict(modality="m0", features=x) | options
        with pytest.raises(error, match=message):
            build_index(bundle, kwargs.pop("modality"), kwargs.pop("features"), path=tmp_path / "idx", **kwargs)
        assert os.listdir(tmp_path) == []  # a failed build leaves nothing behind


def test_never_overwrites(tmp_path, small_index, bundle, ds):
    before = read_index_manifest(small_index.path)
    with pytest.raises(ValueError, match="already exists"):
        build_index(bundle, "m0", ds["m0"].test.features, path=small_index.path)
    with pytest.raises(ValueError, match="already exists"):
        small_index.save(small_index.path)
    assert read_index_manifest(small_index.path) == before


def _flip_byte(file, offset=-3):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x40
    file.write_bytes(bytes(data))


def _edit_manifest(path, edit):
    manifest = json.loads((path / "index.json").read_text())
    edit(manifest)
    (path / "index.json").write_text(json.dumps(manifest))


def test_corrupt_or_tampered_index_files(small_index, bundle):
    path = small_index.path
    pristine = {f: (path / f).read_bytes() for f in os.listdir(path)}

    def restore():
        for f, data in pristine.items():
            (path / f).write_bytes(data)

    def swap_shards(m):
        m["shards"][0], m["shards"][1] = m["shards"][1], m["shards"][0]

    def narrower_codes():  # a well-formed shard with its checksum updated, but the wrong width
        file = path / "shard-00002.safetensors"
        save_file({"codes": np.zeros((10, D - 1), np.float32), "labels": np.zeros(10, np.int64)}, str(file),
                  metadata={"first_row": "50"})
        _edit_manifest(path, lambda m: m["shards"][2].update(sha256=sha256_file(file)))

    cases = [
        (lambda: _flip_byte(path / "shard-00001.safetensors"), "shard-00001.safetensors does not match its checksum"),
        (lambda: (path / "shard-00002.safetensors").unlink(), "index file missing"),
        (lambda: (path / "index.json").write_text("{not json"), "unreadable search index manifest"),
        (lambda: _edit_manifest(path, lambda m: m.update(format="other")), "not an SDML search index"),
        (lambda: _edit_manifest(path, lambda m: m.update(format_version=99)), "version 99 is not supported"),
        (lambda: _edit_manifest(path, lambda m: m.update(rows=59)), "malformed index manifest"),
        (lambda: _edit_manifest(path, lambda m: m["shards"][0].update(file="../x")), "malformed index manifest"),
        (lambda: _edit_manifest(path, lambda m: m.pop("source")), "malformed index manifest"),
        # Shards reordered with their checksums: every file matches its entry, but not its place.
        (lambda: _edit_manifest(path, swap_shards), "shard-00001.safetensors holds rows from 25, but index.json places it at row 0"),
        (narrower_codes, r"'codes' is F32 \[10, 15\], expected F32 \[10, 16\]"),
    ]
    for damage, message in cases:
        damage()
        with pytest.raises(SearchIndexError, match=message):
            load_index(path, bundle)
        restore()
    # Without the checksum pass a damaged header is still caught when the file is opened.
    (path / "shard-00000.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(SearchIndexError, match="unreadable safetensors"):
        load_index(path, bundle, verify=False)
    restore()
    load_index(path, bundle)
    (path / "missing-dir").mkdir()
    with pytest.raises(SearchIndexError, match="not an SDML search index"):
        load_index(path / "missing-dir", bundle)
    with pytest.raises(SearchIndexError, match="index not found"):
        load_index(path / "nowhere", bundle)


def test_refuses_another_bundle(tmp_path, small_index, trained):
    other_p = _save(tmp_path / "other-p", trained, P=make_projection(D, 4, OPTS.seed + 1))
    with pytest.raises(SearchIndexError, match="another projection P"):
        load_index(small_index.path, other_p)
    _, _, report = trained
    changed = dataclasses.replace(report.modalities[0], state={k: v * 1.01 for k, v in report.modalities[0].state.items()})
    other_net = _save(tmp_path / "other-net", trained, results=[changed, *report.modalities[1:]])
    with pytest.raises(SearchIndexError, match="does not hold the 'm0' network"):
        load_index(small_index.path, other_net)
    # A copy of the same bundle elsewhere is the same model. (A bundle saved again from the same
    # results is not byte-identical: safetensors writes its metadata in hash-map order.)
    same = shutil.copytree(small_index.bundle.path, tmp_path / "copy")
    assert load_index(small_index.path, same).n == 60


# ---- command line ---------------------------------------------------------------------------------


def run_main(argv, capsys):
    code = cli.run(search_cli.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data_file(tmp_path, ds):
    path = tmp_path / "data.npz"
    save_npz(ds, path)
    return path


def test_cli_build_query_json_and_csv(tmp_path, bundle_path, ds, data_file, capsys):
    idx = tmp_path / "idx"
    code, out, err = run_main(["build", str(bundle_path), "--modality", "m0", "--features", str(data_file),
                               "--out", str(idx), "--shard-rows", "16"], capsys)
    assert code == 0 and err == "" and "60 'm0' items" in out and "4 shard(s)" in out
    code, out, err = run_main(["query", str(idx), "--modality", "m1", "--features", str(data_file), "-k", "5",
                               "--out", str(tmp_path / "hits.json")], capsys)
    assert code == 0 and "P@5" in out and "mAP@5" in out
    result = json.loads((tmp_path / "hits.json").read_text())
    index = load_index(idx)
    top = index.search_codes(index.encode(ds["m1"].test.features, "m1"), 5)
    assert [r["ids"] for r in result["results"]] == top.indices.tolist()
    assert np.allclose([r["scores"] for r in result["results"]], top.scores.numpy(), atol=0)
    assert result["metrics"] == hit_quality(index, top, ds["m1"].test.labels)
    assert (result["gallery_modality"], result["query_modality"], result["k"]) == ("m0", "m1", 5)

    # CSV, from a plain .npy query file (no labels: no metrics), string ids from a text file.
    np.save(tmp_path / "q.npy", ds["m2"].test.features[:4])
    (tmp_path / "ids.txt").write_text("".join(f"doc{i}\n" for i in range(60)))
    code, out, err = run_main(["build", str(bundle_path), "--modality", "m0", "--features", str(data_file),
                               "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "idx2")], capsys)
    assert code == 0 and "ids: str" in out
    code, out, err = run_main(["query", str(tmp_path / "idx2"), "--modality", "m2", "--features",
                               str(tmp_path / "q.npy"), "-k", "3", "--out", str(tmp_path / "hits.csv")], capsys)
    assert code == 0 and "P@" not in out
    rows = (tmp_path / "hits.csv").read_text().splitlines()
    top = index.search_codes(index.encode(ds["m2"].test.features[:4], "m2"), 3)
    assert rows[0] == "query,rank,id,score" and len(rows) == 1 + 4 * 3
    assert rows[1].split(",")[:3] == ["0", "1", f"doc{int(top.indices[0, 0])}"]
    # Without --out the CSV goes to stdout, the metrics to stderr.
    code, out, err = run_main(["query", str(idx), "--modality", "m1", "--dataset", "npz", "--data", str(data_file),
                               "-k", "2", "--in-memory"], capsys)
    assert code == 0 and out.splitlines()[0] == "query,rank,id,score" and "mAP@2" in err


def test_cli_reads_h5_features_with_x_y_ids_keys(tmp_path, bundle_path, ds, capsys):
    import h5py
    g = ds["m0"].test
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["x"], f["y"] = g.features, g.labels
        f["ids"] = np.array([f"photo-{i}".encode() for i in range(g.n)])  # HDF5 strings come back as bytes
    code, out, _ = run_main(["build", str(bundle_path), "--modality", "m0", "--features", str(tmp_path / "g.h5"),
                             "--out", str(tmp_path / "idx")], capsys)
    assert code == 0 and "ids: str, labels: class_ids" in out
    scores, ids = load_index(tmp_path / "idx").search(ds["m1"].test.features[:2], 3, modality="m1")
    assert all(i.startswith("photo-") for i in ids.flatten())


def test_cli_export_data_and_faiss(tmp_path, bundle_path, capsys):
    code, out, _ = run_main(["export-data", "mfeat", "--out", str(tmp_path / "digits.npz")], capsys)
    assert code == 0 and "fou_test_x" in np.load(tmp_path / "digits.npz").files
    pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu, the bench extra)")
    data = tmp_path / "g.npy"
    np.save(data, np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32))
    assert run_main(["build", str(bundle_path), "--modality", "m0", "--features", str(data), "--out",
                     str(tmp_path / "idx")], capsys)[0] == 0
    code, out, _ = run_main(["export-faiss", str(tmp_path / "idx"), "--out", str(tmp_path / "g.faiss")], capsys)
    assert code == 0 and (tmp_path / "g.faiss").is_file()


def test_cli_errors_are_one_line_with_status_2(tmp_path, bundle_path, data_file, capsys):
    idx = tmp_path / "idx"
    assert run_main(["build", str(bundle_path), "--modality", "m0", "--features", str(data_file), "--out", str(idx)],
                    capsys)[0] == 0
    (tmp_path / "taken.json").write_text("{}")
    np.save(tmp_path / "strings.npy", np.array([["a"] * 48] * 3))
    query = ["query", str(idx), "--features", str(data_file)]
    cases = [
        (query + ["--modality", "zz"], "no modality 'zz'"),
        (query + ["--modality", "m1", "-k", "61"], r"k must be in [1, 60]"),
        (query + ["--modality", "m1", "-k", "0"], "-k must be >= 1"),
        (query + ["--modality", "m1", "--out", str(tmp_path / "taken.json")], "already exists"),
        (query + ["--modality", "m1", "--out", str(tmp_path / "x.txt")], "cannot tell the format"),
        (query + ["--modality", "m1", "--key", "m2_test_x"], "expects features of shape [n, 48]"),
        (["query", str(idx), "--modality", "m1", "--features", str(tmp_path / "strings.npy")], "real numbers"),
        (["query", str(tmp_path / "nowhere"), "--modality", "m1", "--features", str(data_file)], "index not found"),
        (["query", str(idx), "--modality", "m1", "--features", str(tmp_path / "none.npz")], "data file not found"),
        (["build", str(bundle_path), "--modality", "m0", "--features", str(data_file), "--out", str(idx)],
         "already exists"),
        (["build", str(tmp_path), "--modality", "m0", "--features", str(data_file), "--out", str(tmp_path / "o")],
         "not an SDML bundle"),
    ]
    for argv, message in cases:
        code, out, err = run_main(argv, capsys)
        assert code == 2, argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    _flip_byte(idx / "shard-00000.safetensors")
    code, _, err = run_main(query + ["--modality", "m1"], capsys)
    assert code == 2 and "does not match its checksum" in err


def test_cli_module_entry_point(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ok = subprocess.run([sys.executable, "-P", "-m", "sdml_ext.search", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "build" in ok.stdout and "query" in ok.stdout
    bad = subprocess.run([sys.executable, "-P", "-m", "sdml_ext.search", "query", str(tmp_path / "none"), "--modality",
                          "m0", "--features", "x.npy"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: search index not found: {tmp_path / 'none'}"


def test_a_moved_bundle_is_named_and_can_be_given(tmp_path, trained, ds):
    bundle = sdml_ext.load(_save(tmp_path / "b", trained))
    build_index(bundle, "m0", ds["m0"].test.features, path=tmp_path / "idx")
    os.rename(tmp_path / "b", tmp_path / "moved")
    with pytest.raises(SearchIndexError, match=r"not at .*/b \(moved\?\); pass the bundle"):
        load_index(tmp_path / "idx")
    assert load_index(tmp_path / "idx", tmp_path / "moved").search(ds["m1"].test.features, 2, modality="m1").ids.shape == (60, 2)
