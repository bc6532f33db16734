"""``python -m sdml_ext.search``: build an index of a gallery with a bundle, query it with features of
another modality, write the top-k ids as JSON or CSV (plus P@k / mAP@k when both sides have labels),
export it to faiss. See ``--help``.

Features come from a file or from a dataset (``--dataset``, as in ``python -m sdml_ext.train``):

- ``.npy``: one (n, D) array, memory-mapped, so a gallery larger than memory streams through the
  build; ids from ``--ids``.
- ``.npz``, ``.h5``/``.hdf5``, ``.mat`` or a directory of ``.npy`` files: ``--key`` names the
  features array; otherwise the package's dataset layout (``{modality}_{split}_x`` and ``_y``,
  see :mod:`sdml_ext.data.generic`, written by :func:`sdml_ext.data.save_npz`) or the keys ``x`` /
  ``features`` with ``y`` / ``labels`` and ``ids``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..data import DATASET_NAMES, detect_layout, load_dataset, save_npz
from ..data._io import ArrayFile, check_path, load_npy, strings
from ..search.faiss_export import KINDS, check_options, export_faiss
from ..search.format import CODE_DTYPES
from ..search.index import build_index, load_index
from ..search.quality import hit_quality
from ..store.files import write_new_file
from ..wording import plural
from .arguments import at_least_one, check_paths, refuse_empty

SPLITS = ("test", "val", "train")


class Features:
    """What a features source holds: x [n, D] (possibly a memory map), labels or None, ids or None."""

    def __init__(self, x, labels=None, ids=None):
        if np.ndim(x) != 2:
            raise ValueError(f"--features: the features must be an (n, D) array, got one of shape {np.shape(x)}")
        self.x, self.labels, self.ids = x, labels, ids


def read_ids(path: str) -> np.ndarray:
    """Ids from a .npy array (ints or strings, no pickle) or a text file of one id per line."""
    path = check_path(path)
    if path.endswith(".npy"):
        return load_npy(path, f"--ids {path}")
    with open(path, encoding="utf-8") as f:
        return np.array([line.rstrip("\n") for line in f if line.strip()], dtype=object)


def read_features(args, modality: str) -> Features:
    """The features of `modality` named by --features/--key or --dataset/--data, and --split
    (--data alone: the dataset's layout is detected from the file, as ``train`` does)."""
    if args.features is None and args.dataset is None and args.data is None:
        raise ValueError("name the features: --features FILE, or a dataset with --data PATH and/or --dataset NAME")
    if args.features is not None and args.data is not None:
        raise ValueError("--data names a dataset's file and does not go with --features (give one of them)")
    if args.features is None:
        name = args.dataset or detect_layout(args.data)
        split = load_dataset(name, args.data)[modality].split(args.split)
        return Features(split.features, split.labels)
    path = check_path(args.features)
    if path.endswith(".npy"):
        return Features(load_npy(path, f"--features {path}", mmap_mode="r"))
    with ArrayFile(path) as f:
        if args.key:
            x_key, y_keys = args.key, ()
        elif f"{modality}_{args.split}_x" in f:
            x_key, y_keys = f"{modality}_{args.split}_x", (f"{modality}_{args.split}_y",)
        else:
            x_key, y_keys = f.first_present(("x", "features", f"{modality}_{args.split}_x"), "features"), ("y", "labels")
        y_key = next((k for k in y_keys if k in f), None)
        labels = None if y_key is None else np.asarray(f[y_key])
        if labels is not None and labels.ndim == 2 and 1 in labels.shape and labels.size == np.shape(f[x_key])[0]:
            labels = labels.reshape(-1)  # MATLAB id vectors are (1, n) or (n, 1)
        ids = np.asarray(f["ids"]) if "ids" in f else None
        if ids is not None and not np.issubdtype(ids.dtype, np.integer):
            ids = np.array(strings(ids), dtype=object)  # bytes from HDF5, char matrices from MATLAB
        return Features(np.asarray(f[x_key]), labels, ids)


def _source_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("features (one of --features, --dataset/--data)")
    one = src.add_mutually_exclusive_group()
    one.add_argument("--features", metavar="FILE", help=".npy (n, D) array, or .npz/.h5/.mat/.npy-directory file")
    one.add_argument("--dataset", choices=DATASET_NAMES, metavar="NAME",
                     help=f"read a split of a dataset instead: {', '.join(DATASET_NAMES)}")
    src.add_argument("--data", metavar="PATH",
                     help="the dataset's file (every dataset but mfeat and synthetic); without --dataset its layout "
                          "is detected from its keys")
    src.add_argument("--split", choices=SPLITS, default="test",
                     help="split of a dataset or of a file in the dataset layout (default: test)")
    src.add_argument("--key", metavar="KEY", help="name of the features array in the file")
    src.add_argument("--modality", required=True, metavar="NAME", help="the modality of these features (a bundle modality)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdml_ext.search",
        description=(
            "Cross-modal search with a trained SDML bundle: encode a gallery of one modality into an index "
            "(safetensors shards + index.json), query it with features of any modality of the same bundle, "
            "get the top-k ids by cosine similarity (exact; ties by gallery row)."
        ),
        epilog=(
            "examples:\n"
            "  python -m sdml_ext.search build runs/digits --modality fou --dataset mfeat --out runs/fou.index\n"
            "  python -m sdml_ext.search query runs/fou.index --modality kar --dataset mfeat -k 10 --out hits.json\n"
            "  python -m sdml_ext.search build runs/xmedia --modality text --features text.npy \\\n"
            "      --ids text-ids.txt --out runs/text.index\n"
            "  python -m sdml_ext.search export-data mfeat --out digits.npz     # a features file in the dataset layout\n"
            "errors in the input print one line and exit with status 2 (SDML_DEBUG=1 shows the traceback)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", allow_abbrev=False, help="encode a gallery into a new index directory")
    b.add_argument("bundle", metavar="BUNDLE", help="bundle directory written by python -m sdml_ext.train")
    _source_arguments(b)
    b.add_argument("--ids", metavar="FILE",
                   help="gallery ids: .npy (ints or strings) or text, one per line (default: row numbers)")
    b.add_argument("--no-labels", action="store_true",
                   help="do not store the gallery labels (they enable P@k / mAP of queries)")
    b.add_argument("--out", required=True, metavar="INDEX", help="new index directory (never overwritten)")
    b.add_argument("--shard-rows", type=int, metavar="N", help="rows per shard file (default: ~64 MiB of codes)")
    b.add_argument("--block-rows", type=int, metavar="N", help="rows encoded at a time (default: ~32 MiB of codes)")
    b.add_argument("--dtype", choices=tuple(CODE_DTYPES), default="float32",
                   help="storage of the codes: float16 halves the files and the bytes a search reads (default: float32)")
    b.add_argument("--device", default="cpu", metavar="DEV", help="device of the networks, e.g. cuda:0 (default: cpu)")

    q = sub.add_parser("query", allow_abbrev=False, help="search an index with features of a modality; write the top-k ids")
    q.add_argument("index", metavar="INDEX", help="index directory written by build")
    _source_arguments(q)
    q.add_argument("-k", "--k", type=int, default=10, metavar="K", help="results per query (default: 10)")
    q.add_argument("--bundle", metavar="BUNDLE", help="the bundle (default: the path recorded in the index)")
    q.add_argument("--out", metavar="FILE", help="results file, .json or .csv (never overwritten; default: CSV on stdout)")
    q.add_argument("--format", choices=("json", "csv"), help="output format (default: from the --out extension)")
    q.add_argument("--in-memory", action="store_true", help="read the whole gallery into memory instead of streaming it")
    q.add_argument("--block-rows", type=int, metavar="N", help="gallery rows searched at a time (default: ~32 MiB of codes)")
    q.add_argument("--device", default="cpu", metavar="DEV", help="device of the search, e.g. cuda:0 (default: cpu)")
    q.add_argument("--no-verify", action="store_true", help="skip the checksum pass over the index files")

    f = sub.add_parser("export-faiss", allow_abbrev=False, help="write the index's codes as a faiss IVF or HNSW index (needs faiss)")
    f.add_argument("index", metavar="INDEX")
    f.add_argument("--out", required=True, metavar="FILE", help="new faiss index file (faiss.read_index reads it)")
    f.add_argument("--kind", choices=KINDS, default="ivf", help="ivf (IndexIVFFlat, default) or hnsw (IndexHNSWFlat)")
    f.add_argument("--nlist", type=int, metavar="N", help="IVF lists (default ~4 sqrt(n))")
    f.add_argument("--nprobe", type=int, metavar="N", help="IVF lists scanned per query (default nlist/16)")

    e = sub.add_parser("export-data", allow_abbrev=False, help="write a dataset in the package's .npz layout ({modality}_{split}_x/_y)")
    e.add_argument("name", choices=DATASET_NAMES, metavar="NAME", help=f"dataset: {', '.join(DATASET_NAMES)}")
    e.add_argument("--data", metavar="PATH", help="the dataset's file (every dataset but mfeat and synthetic)")
    e.add_argument("--out", required=True, metavar="FILE", help="new .npz file (never overwritten)")
    return p


def cmd_build(args) -> int:
    at_least_one(args.shard_rows, "--shard-rows")
    at_least_one(args.block_rows, "--block-rows")
    from ..store.bundle import load

    bundle = load(args.bundle, args.device)
    bundle.input_dim(args.modality)  # an unknown modality is named before any data is read
    source = read_features(args, args.modality)
    ids = read_ids(args.ids) if args.ids else source.ids
    labels = None if args.no_labels else source.labels
    index = build_index(bundle, args.modality, source.x, ids=ids, labels=labels, path=args.out,
                        shard_rows=args.shard_rows, block_rows=args.block_rows, dtype=args.dtype)
    print(f"wrote {args.out}: {plural(index.n, repr(args.modality) + ' item')}, d={index.d}, {index.shard_count} shard(s), "
          f"{args.dtype}, ids: {index.id_kind}, labels: {index.label_kind or 'none'}")
    return 0


def _output_format(args) -> str:
    if args.format:
        return args.format
    if args.out is None:
        return "csv"
    ext = Path(args.out).suffix.lower().lstrip(".")
    if ext not in ("json", "csv"):
        raise ValueError(f"--out {args.out}: cannot tell the format from the extension; use .json or .csv, or --format")
    return ext


def cmd_query(args) -> int:
    at_least_one(args.k, "-k")
    at_least_one(args.block_rows, "--block-rows")
    fmt = _output_format(args)
    if args.out and Path(args.out).exists():
        raise FileExistsError(f"output {args.out} already exists; choose another path or remove it first")
    index = load_index(args.index, args.bundle, in_memory=args.in_memory, device=args.device,
                       block_rows=args.block_rows, verify=not args.no_verify)
    index.bundle.input_dim(args.modality)  # an unknown modality is named before any data is read
    source = read_features(args, args.modality)
    if len(source.x) == 0:
        raise ValueError(f"the query features of {args.modality!r} have 0 rows")
    top = index.search_codes(index.encode(source.x, args.modality), args.k)
    ids = index.ids_of(top.indices).tolist()
    scores = top.scores.tolist()
    quality = None
    if source.labels is not None and index.label_kind is not None:
        quality = hit_quality(index, top, source.labels)
    query_names = source.ids.tolist() if source.ids is not None else list(range(len(ids)))

    def write_json(file) -> None:
        json.dump({
            "index": str(args.index), "gallery_modality": index.modality, "query_modality": args.modality,
            "k": args.k, "metrics": quality,
            "results": [{"query": q, "ids": i, "scores": s} for q, i, s in zip(query_names, ids, scores)],
        }, file, indent=1)
        file.write("\n")

    def write_csv(file) -> None:
        out = csv.writer(file, lineterminator="\n")
        out.writerow(["query", "rank", "id", "score"])
        for q, row_ids, row_scores in zip(query_names, ids, scores):
            for rank, (i, s) in enumerate(zip(row_ids, row_scores), 1):
                out.writerow([q, rank, i, f"{s:.6f}"])

    write = write_json if fmt == "json" else write_csv
    report = sys.stdout
    if args.out:
        def to_file(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())

        write_new_file(args.out, to_file)
        print(f"wrote {args.out}: top {args.k} of {plural(index.n, repr(index.modality) + ' item')} "
              f"for {plural(len(ids), repr(args.modality) + ' query', repr(args.modality) + ' queries')}")
    else:
        write(sys.stdout)
        sys.stdout.flush()  # a reader that has gone (| head) ends the command here, before the metrics
        report = sys.stderr
    if quality is not None:
        print(f"P@{args.k} {quality['precision_at_k']:.4f}  mAP@{args.k} {quality['map_at_k']:.4f}  "
              f"({plural(quality['queries'], 'query', 'queries')})", file=report)
    return 0


def cmd_export_faiss(args) -> int:
    check_options(args.kind, args.nlist, args.nprobe)  # before anything is read or imported
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise ValueError("export-faiss needs faiss: pip install faiss-cpu (or sdml_ext[bench])") from None
    index = load_index(args.index)
    export_faiss(index, args.out, args.kind, nlist=args.nlist, nprobe=args.nprobe)
    print(f"wrote {args.out}: faiss {args.kind} index of {index.n} codes (inner product = cosine)")
    return 0


def cmd_export_data(args) -> int:
    if Path(args.out).exists():
        raise FileExistsError(f"output {args.out} already exists; choose another path or remove it first")
    dataset = load_dataset(args.name, args.data)
    save_npz(dataset, args.out)
    print(f"wrote {args.out}: {dataset.name}, modalities {', '.join(dataset.modality_names)}; "
          "features under {modality}_{split}_x, labels under {modality}_{split}_y")
    return 0


COMMANDS = {"build": cmd_build, "query": cmd_query, "export-faiss": cmd_export_faiss, "export-data": cmd_export_data}


# The kind of path each command's arguments name (by dest), for check_paths.
PATHS = {
    "build": dict(directories=("bundle",), files=("ids",), new_directories=("out",)),
    "query": dict(directories=("index", "bundle"), new_files=("out",)),
    "export-faiss": dict(directories=("index",), new_files=("out",)),
    "export-data": dict(new_files=("out",)),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_empty(parser, args)
    check_paths(parser, args, **PATHS[args.command])
    return COMMANDS[args.command](args)

