"""``python -m sdml_ext.evaluate BUNDLE``: encode a split of the bundle's dataset, print the m x m
mAP@all and mAP@k tables, write metrics.json and the precision-recall and precision@K curves
(PNG). See ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import BUILT_IN_DATASETS, DATASET_NAMES, detect_layout, load_dataset
from ..eval.curve_notes import curve_notes
from ..eval.evaluation import curves, encode_split, evaluate
from ..eval.plots import plot_curves
from ..store.bundle import load
from ..store.files import json_safe, write_json_atomic
from .arguments import at_least_one, check_paths, refuse_empty
from .runner import run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # no prefix matching: a mistyped flag (--epoch) is an error, not another flag
        prog="python -m sdml_ext.evaluate",
        description=(
            "Evaluate an SDML bundle: encode the test split of every modality, print the mAP@all "
            "and mAP@K tables over all ordered modality pairs (cosine similarity; ties by gallery "
            "index), write metrics.json, precision_recall.png and precision_at_k.png. The dataset "
            "is the one recorded in the bundle unless --dataset/--data say otherwise."
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory written by python -m sdml_ext.train")
    p.add_argument("--dataset", choices=DATASET_NAMES, metavar="NAME", help=f"dataset kind: {', '.join(DATASET_NAMES)}")
    p.add_argument("--data", metavar="PATH",
                   help="data file or directory (e.g. when the file has moved); read as the bundle's dataset kind, "
                        "or, for a bundle of built-in data, in the layout detected from the file")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="split to evaluate (default: test)")
    p.add_argument("--k", type=int, default=50, metavar="K", help="cut-off of the second table, mAP@K (default: 50)")
    p.add_argument("--empty", choices=("zero", "skip"),
                   help="queries with no relevant item count as 0 (zero) or are left out (skip); default: zero "
                        "for single-label data, skip for multi-label (the authors' rule)")
    p.add_argument("--out", metavar="DIR", help="where metrics.json and the PNGs go (default: BUNDLE/evaluation)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="device of the networks that encode the split, e.g. cuda:0 (default: cpu; the mAP tables "
                        "are computed on the CPU either way)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_empty(parser, args)
    check_paths(parser, args, directories=("bundle",), new_directories=("out",))
    at_least_one(args.k, "--k")
    bundle = load(args.bundle, args.device)
    config = bundle.config
    name = args.dataset or config.get("dataset", "mfeat")
    path = args.data if (args.data or args.dataset) else config.get("data")
    options = config.get("dataset_options", {}) if args.dataset is None else {}
    if args.data and args.dataset is None and name in BUILT_IN_DATASETS:
        name, options = detect_layout(args.data), {}  # the bundle's kind takes no file: detect its layout
    dataset = load_dataset(name, path, **options)
    out = Path(args.out) if args.out else Path(args.bundle) / "evaluation"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None

    encoded = encode_split(bundle, dataset, args.split)
    result = evaluate(encoded, k=args.k, empty=args.empty)
    print(result.format())
    pr, pk = curves(encoded, empty=args.empty)
    metrics = result.to_json()
    metrics["precision_recall"] = {"recall": pr.x.tolist(), **{f"{q}->{g}": y.tolist() for (q, g), y in pr.curves.items()}}
    metrics["precision_at_k"] = {"k": pk.x.tolist(), **{f"{q}->{g}": y.tolist() for (q, g), y in pk.curves.items()}}
    metrics_path = out / "metrics.json"
    write_json_atomic(metrics_path, json_safe(metrics))
    pngs = plot_curves(pr, pk, out, dataset=dataset.name, split=args.split, notes=curve_notes(result))
    print(f"\nwrote {metrics_path}, {', '.join(str(p) for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
