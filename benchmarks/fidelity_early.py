"""Many short runs of one modality, product against reference: is a difference in the validation
loss curves systematic or seed noise? Cheap where the 200-epoch table is not.

    python benchmarks/fidelity_early.py --dataset pascal_sentence_partial --modality 0 --epochs 10 --seeds 0-19

Prints, per epoch, the mean validation supervised loss of each implementation over the seeds, the
difference and the difference in standard errors (Welch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_reference as ref  # noqa: E402
from fidelity import BATCH, load, parse_seeds  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="pascal_sentence_partial")
    ap.add_argument("--modality", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-19"))
    ap.add_argument("--json", type=Path, help="also write the per-seed curves here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from sdml_ext.model import make_projection
    from sdml_ext.engine.training import ModalityTrainer, TrainOptions, make_tasks

    ds = load(args.dataset)
    batch = BATCH.get(args.dataset, 100)
    curves = {"product": [], "reference": []}
    for seed in args.seeds:
        opts = TrainOptions(epochs=args.epochs, batch_size=batch, preprocess="none", seed=seed)
        task = make_tasks(ds, make_projection(opts.code_dim, ds.num_classes, seed), opts)[args.modality]
        curves["product"].append([s.val_sup for s in ModalityTrainer(task).run().history])
        P = ref.make_P(ref.CODE_DIM, ds.num_classes, seed)
        lr = ref.LRS[min(args.modality, len(ref.LRS) - 1)]
        _, run = ref.train_modality(task.train_x, task.train_y, task.val_x, task.val_y, P, lr,
                                    seed * 1000 + args.modality, args.epochs, batch)
        curves["reference"].append(run.val_sup)
        print(f"seed {seed}: product {curves['product'][-1][-1]:.4f} reference {run.val_sup[-1]:.4f}", file=sys.stderr)
    p, r = np.array(curves["product"]), np.array(curves["reference"])
    print(f"{args.dataset} modality {args.modality}, {len(args.seeds)} seeds: validation supervised loss")
    print("epoch  product (sd)       reference (sd)     diff     diff/SE")
    for e in range(args.epochs):
        se = math.sqrt(p[:, e].var(ddof=1) / len(p) + r[:, e].var(ddof=1) / len(r))
        diff = p[:, e].mean() - r[:, e].mean()
        print(f"{e + 1:5d}  {p[:, e].mean():.4f} ({p[:, e].std(ddof=1):.4f})  {r[:, e].mean():.4f} ({r[:, e].std(ddof=1):.4f})"
              f"  {diff:+.4f}  {diff / se:+.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
