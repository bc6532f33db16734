"""Lockstep comparison: the product's trainer and the reference loop started from the same
weights, P and batch order, one modality, compared step by step.

    python benchmarks/fidelity_lockstep.py --dataset mfeat --modality 0 --epochs 5
    python benchmarks/fidelity_lockstep.py --swap loss       # the reference with the product's fused loss
    python benchmarks/fidelity_lockstep.py --swap optimizer  # the reference with fused Adam
    python benchmarks/fidelity_lockstep.py --swap both --step autograd   # bit for bit

With identical inputs the two can differ only by floating-point rounding (summation order in the
fused loss and fused Adam). This prints, per epoch, the relative weight difference and both
validation supervised losses; a different algorithm would show up as an O(1) difference after
the first step, rounding as ~1e-7 growing slowly. --swap replaces one piece of the reference by
the product's, to tell which piece a difference comes from. --step picks the product's CPU step:
explicit (the default, sdml_ext.engine.explicit_step: its own GEMM order, so rounding even with
--swap both) or autograd (the step CUDA devices take: with --swap both the reference's bits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_reference as ref  # noqa: E402
from fidelity import load  # noqa: E402

NAMES = {"encoder.0": "enc1", "encoder.2": "enc2", "encoder.4": "enc3",
         "decoder.0": "dec1", "decoder.2": "dec2", "decoder.4": "dec3"}


def to_reference(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        layer, _, kind = k.rpartition(".")
        out[f"{NAMES[layer]}.{kind}"] = v.detach().clone()
    return out


def fused_loss(x_hat, x, h, P, y, lam):
    from sdml_ext.ops import dsae_loss

    out = dsae_loss(x_hat, x, h, P, y, lam)
    return out.loss, out.rec, out.sup


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mfeat")
    ap.add_argument("--modality", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--swap", choices=("none", "loss", "optimizer", "both"), default="none")
    ap.add_argument("--perturb", action="store_true",
                    help="nudge one initial weight of the reference by one float32 ulp: with --swap both, the "
                         "divergence that rounding alone produces, to set the product's against")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--step", choices=("explicit", "autograd"), default="explicit",
                    help="the product's CPU training step (explicit: the default one; autograd: the reference's ops)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from sdml_ext.model import make_projection
    from sdml_ext.engine.training import ModalityTrainer, TrainOptions, make_tasks

    ds = load(args.dataset)
    opts = TrainOptions(epochs=args.epochs, batch_size=args.batch, preprocess="none", seed=args.seed)
    P = make_projection(opts.code_dim, ds.num_classes, args.seed)
    task = make_tasks(ds, P, opts)[args.modality]
    trainer = ModalityTrainer(task, explicit=args.step == "explicit")

    net = ref.Autoencoder(task.input_dim)
    net.load_state_dict(to_reference(trainer.model.state_dict()))
    if args.perturb:
        with torch.no_grad():
            w = net.enc1.weight.view(-1)
            w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))
    loss_fn = fused_loss if args.swap in ("loss", "both") else ref.eager_loss
    if args.swap in ("optimizer", "both"):
        make_opt = lambda params, lr: torch.optim.Adam(params, lr=lr, betas=ref.BETAS, fused=True)  # noqa: E731
    else:
        make_opt = ref.adam
    shuffle = torch.Generator()
    shuffle.set_state(trainer.shuffle.get_state())  # the orders the trainer is about to draw
    orders = []
    print(f"{args.dataset} modality {task.name} (D={task.input_dim}, lr={trainer.lr}), swap={args.swap}, "
          f"perturb={args.perturb}, step={args.step}")
    print("epoch  rel|W_prod - W_ref|  val_sup product  val_sup reference")
    opt = make_opt(net.parameters(), trainer.lr)
    for epoch in range(1, args.epochs + 1):
        orders.append(torch.randperm(task.train_x.shape[0], generator=shuffle).numpy())
        trainer.begin_epoch()
        for j in range(trainer.steps_per_epoch):
            trainer.step(j)
        prod = trainer.end_epoch()
        # one reference epoch with the same order, continuing its own optimizer
        _, run = ref.train_modality(task.train_x, task.train_y, task.val_x, task.val_y, P, trainer.lr, 0, 1,
                                    args.batch, model=net, loss_fn=loss_fn,
                                    make_optimizer=lambda params, lr: opt, order=lambda e, n: orders[epoch - 1])
        wp = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        wr = torch.cat([net.state_dict()[NAMES[k.rpartition('.')[0]] + '.' + k.rpartition('.')[2]].flatten()
                        for k, _ in trainer.model.named_parameters()])
        print(f"{epoch:5d}  {float((wp - wr).norm() / wp.norm()):.3e}          {prod.val_sup:.6f}        {run.val_sup[0]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
