"""Fused DSAE loss vs the eager composition vs torch.compile of it: forward + ``loss.backward()``.

Run: .venv/bin/python -m pytest benchmarks/bench_dsae_loss.py --benchmark-group-by=group
 or: .venv/bin/python -P benchmarks/bench_dsae_loss.py [--rounds 7]   # B = D = 4096: fused vs eager
     interleaved, with the floor from the copy bandwidth measured in every round
Each case checks that the three agree before it times them. A timed step is what a training step
runs: the forward, then ``loss.backward()`` into gradients set to None first (as
``optimizer.zero_grad()`` leaves them), so the fused op's backward hands on the gradients its
forward formed. ``extra_info`` carries the bytes-moved floor: every input read once and every
gradient written once, over the measured copy bandwidth.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

import sdml_ext
from sdml_ext.ops import dsae_loss

# (B, D, d, c): a paper-size batch, a large batch of 4096-d image features, 300-d text with 80 classes.
SHAPES = [(100, 4096, 512, 10), (4096, 4096, 512, 10), (4096, 300, 512, 80)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def eager(x_hat, x, h, P, y, lam=0.5):
    """The loss as one would write it with PyTorch ops."""
    r = torch.linalg.vector_norm(x_hat - x, dim=1)
    s = torch.linalg.vector_norm(h @ P - y, dim=1)
    labelled = (y != 0).any(dim=1)
    return lam * r.mean() + (1 - lam) * (s * labelled).sum() / labelled.sum().clamp_min(1)


def fused(x_hat, x, h, P, y, lam=0.5):
    return dsae_loss(x_hat, x, h, P, y, lam).loss


IMPLS = {"fused": fused, "eager": eager, "compiled": None}  # compiled: one graph per case, below


def make_case(B, D, d, c, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g)
    x_hat = (x + 0.1 * torch.randn(B, D, generator=g)).requires_grad_()
    h = torch.randn(B, d, generator=g).requires_grad_()
    P = torch.linalg.qr(torch.randn(d, c, generator=g))[0]
    y = torch.nn.functional.one_hot(torch.randint(0, c, (B,), generator=g), c).float()
    return [t.to(device).detach().requires_grad_(t.requires_grad) for t in (x_hat, x, h, P, y)]


def fwd_bwd(fn, x_hat, x, h, P, y):
    """Forward and ``loss.backward()`` as a training step runs them; the loss and the gradients of
    x_hat and h (fresh tensors each call: earlier results stay valid)."""
    x_hat.grad = h.grad = None
    loss = fn(x_hat, x, h, P, y)
    loss.backward()
    return loss.detach(), x_hat.grad, h.grad


def floor_seconds(inputs, bandwidth):
    x_hat, x, h, P, y = inputs
    read = sum(t.numel() * t.element_size() for t in inputs)
    written = (x_hat.numel() + h.numel()) * x_hat.element_size()
    return (read + written) / bandwidth


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_D{}_d{}_c{}".format(*s))
def test_dsae_loss_fwd_bwd(benchmark, shape, device, impl, copy_bandwidth):
    inputs = make_case(*shape, device)
    fn = torch.compile(eager, dynamic=False) if impl == "compiled" else IMPLS[impl]
    want = fwd_bwd(eager, *inputs)
    got = fwd_bwd(fn, *inputs)  # also warms up torch.compile
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        fwd_bwd(fn, *inputs)
        sync()

    benchmark.group = f"dsae_loss {device} B{shape[0]} D{shape[1]} d{shape[2]} c{shape[3]}"
    if device == "cpu":
        benchmark.extra_info["floor_ms"] = 1e3 * floor_seconds(inputs, copy_bandwidth)
        benchmark.extra_info["copy_GBps"] = copy_bandwidth / 1e9
    benchmark.pedantic(run, rounds=15 if shape[0] >= 4096 else 50, warmup_rounds=2)


def main(argv=None) -> int:
    """Fused vs eager forward + backward at B = D = 4096 (d 512, c 10), alternating each round, with
    the floor from the copy bandwidth measured in the same round; medians of the rounds' best of 3."""
    import argparse

    sys.path.insert(0, str(Path(__file__).parent))
    from common import measured_copy_bandwidth

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    inputs = make_case(4096, 4096, 512, 10, "cpu")
    for a, b in zip(fwd_bwd(fused, *inputs), fwd_bwd(eager, *inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    res = {"eager": [], "fused": [], "floor": [], "load1": []}
    for r in range(args.rounds):
        res["load1"].append(round(os.getloadavg()[0], 2))
        res["floor"].append(floor_seconds(inputs, measured_copy_bandwidth()))
        order = [("eager", eager), ("fused", fused)]
        for name, fn in order[r % 2 :] + order[: r % 2]:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fwd_bwd(fn, *inputs)
                times.append(time.perf_counter() - t0)
            res[name].append(min(times))
    m = {k: statistics.median(v) for k, v in res.items() if k != "load1"}
    print(f"threads {torch.get_num_threads()}, load1 per round {res['load1']}")
    print(f"gradient stores: {sdml_ext.build_info()['cpu_loss_stores']}")
    print(f"fused {m['fused'] * 1e3:.1f} ms, eager {m['eager'] * 1e3:.1f} ms -> {m['eager'] / m['fused']:.2f}x eager "
          f"(target >= 5x); floor {m['floor'] * 1e3:.1f} ms -> fused at {m['fused'] / m['floor']:.2f}x it (target <= 1.5x)")
    print("rounds (ms):", {k: [round(x * 1e3, 1) for x in v] for k, v in res.items() if k != "load1"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
