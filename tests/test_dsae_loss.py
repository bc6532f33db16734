"""sdml::dsae_loss against a plain PyTorch reference: forward, gradients, opcheck, compile, errors."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sdml_ext
from sdml_ext import _extension
from sdml_ext.loss import DSAELoss
from sdml_ext.ops import dsae_loss

from helpers import DEVICES, requires_cuda

# (B, D, d, c): single row, single column, c = 1, c = d, odd sizes, the paper's shapes.
SHAPES = [(1, 1, 1, 1), (1, 7, 5, 3), (5, 13, 16, 1), (4, 9, 6, 6), (33, 129, 64, 10), (100, 300, 512, 80)]
CPU_DTYPES = [torch.float32, torch.float64]
# Relative error bounds against a float64 reference: a few ulps of float32 accumulation over the
# largest shape, and float64 round-off with room for reordering.
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def reference(x_hat, x, h, P, y, lam):
    """The SDML objective written from the definition, with plain PyTorch ops."""
    r = torch.linalg.vector_norm(x_hat - x, dim=1)
    s = torch.linalg.vector_norm(h @ P - y, dim=1)
    labelled = (y != 0).any(dim=1)
    s = torch.where(labelled, s, torch.zeros_like(s))
    n = int(labelled.sum())
    rec = r.mean()
    sup = s.sum() / n if n else s.sum() * 0
    return lam * rec + (1 - lam) * sup, rec, sup, r, s, n


def make_inputs(B, D, d, c, dtype, device, seed=0, unlabelled=(), exact_rows=()):
    """Random inputs; rows in ``unlabelled`` get all-zero labels, rows in ``exact_rows`` zero residuals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x_hat = x + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    h = torch.randn(B, d, generator=g, dtype=torch.float64)
    P = torch.linalg.qr(torch.randn(d, c, generator=g, dtype=torch.float64))[0]
    y = torch.zeros(B, c, dtype=torch.float64)
    y[torch.arange(B), torch.randint(0, c, (B,), generator=g)] = 1
    for j in unlabelled:
        y[j] = 0
    for j in exact_rows:
        x_hat[j] = x[j]
    return [t.to(device=device, dtype=dtype) for t in (x_hat, x, h, P, y)]


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_against_reference(inputs, lam, tol, weights=True):
    """Forward outputs and the gradients of a weighted sum of all of them, vs the reference."""
    ours = [t.clone().requires_grad_(i in (0, 1, 2)) for i, t in enumerate(inputs)]
    ref = [t.detach().double().cpu().requires_grad_(i in (0, 1, 2)) for i, t in enumerate(inputs)]
    out = dsae_loss(*ours, lam=lam)
    loss, rec, sup, r, s, n = reference(*ref, lam)
    assert int(out.n_labelled) == n
    for a, b in zip(out[:5], (loss, rec, sup, r, s)):
        assert rel_err(a, b.detach()) <= tol
    B = inputs[0].shape[0]
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if weights else torch.zeros(B, dtype=torch.float64)
    total_ours = out.loss + 0.3 * out.rec + 0.7 * out.sup + (w.to(out.row_rec) * out.row_rec).sum() + (
        w.flip(0).to(out.row_sup) * out.row_sup
    ).sum()
    total_ref = loss + 0.3 * rec + 0.7 * sup + (w * r).sum() + (w.flip(0) * s).sum()
    total_ours.backward()
    total_ref.backward()
    for a, b in zip(ours[:3], ref[:3]):
        assert torch.isfinite(a.grad).all()
        assert rel_err(a.grad, b.grad) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    inputs = make_inputs(*shape, dtype, device, seed=sum(shape))
    check_against_reference(inputs, 0.5, REL_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_lambda_and_loss_only_backward(lam, dtype, device):
    inputs = make_inputs(17, 31, 24, 5, dtype, device, seed=3, unlabelled=[2, 5])
    check_against_reference(inputs, lam, REL_TOL[dtype], weights=False)


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_unlabelled(device):
    x_hat, x, h, P, y = make_inputs(6, 11, 8, 3, torch.float64, device, unlabelled=range(6))
    h.requires_grad_()
    out = dsae_loss(x_hat, x, h, P, y)
    assert int(out.n_labelled) == 0 and float(out.sup.detach()) == 0.0 and (out.row_sup == 0).all()
    out.loss.backward()
    assert (h.grad == 0).all()
    check_against_reference([x_hat, x, h.detach(), P, y], 0.5, REL_TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_zero_residual_rows_get_zero_gradient(dtype, device):
    # P = I and h = y make P^T h - y exactly zero; x_hat = x makes the reconstruction residual zero.
    B, c = 5, 4
    x_hat, x, _, _, y = make_inputs(B, 9, c, c, dtype, device, exact_rows=[1, 3])
    P = torch.eye(c, dtype=dtype, device=device)
    h = y.clone()
    h[0] += 0.25
    x_hat.requires_grad_()
    h.requires_grad_()
    out = dsae_loss(x_hat, x, h, P, y)
    out.loss.backward()
    assert float(out.row_rec[1].detach()) == 0 and float(out.row_sup[2].detach()) == 0
    assert torch.isfinite(x_hat.grad).all() and torch.isfinite(h.grad).all()
    assert (x_hat.grad[[1, 3]] == 0).all() and (h.grad[1:] == 0).all() and (h.grad[0] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_non_contiguous_inputs(dtype, device):
    B, D, d, c = 9, 14, 12, 5
    x_hat, x, h, P, y = make_inputs(B, D, d, c, dtype, device, seed=7, unlabelled=[4])
    wide = torch.randn(B, 2 * D, dtype=dtype, device=device)
    wide[:, 1::2] = x_hat
    x_hat_nc = wide[:, 1::2]  # column stride 2
    x_nc = x.t().contiguous().t()  # column-major
    h_nc = torch.cat([h, h], dim=1)[:, :d]  # row stride 2d
    P_nc = P.t().contiguous().t()
    y_nc = y.repeat(2, 1)[::2]  # row stride 2 rows
    assert not any(t.is_contiguous() for t in (x_hat_nc, x_nc, h_nc, P_nc, y_nc))
    check_against_reference([x_hat_nc, x_nc, h_nc, P_nc, y_nc], 0.5, REL_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_input_gradient_when_x_requires_grad(device):
    x_hat, x, h, P, y = make_inputs(4, 6, 5, 2, torch.float64, device)
    x_hat.requires_grad_()
    x.requires_grad_()
    dsae_loss(x_hat, x, h, P, y).loss.backward()
    assert torch.equal(x.grad, -x_hat.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    x_hat, x, h, P, y = make_inputs(6, 7, 5, 3, torch.float64, device, seed=11, unlabelled=[2])
    args = [t.requires_grad_() for t in (x_hat, x, h)]

    def f(x_hat, x, h):
        return tuple(dsae_loss(x_hat, x, h, P, y, lam=0.4)[:5])

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_opcheck(dtype, device):
    x_hat, x, h, P, y = make_inputs(7, 10, 8, 3, dtype, device, seed=5, unlabelled=[0])
    for grads in [(x_hat, h), (x_hat, x, h)]:
        for t in grads:
            t.requires_grad_()
        torch.library.opcheck(torch.ops.sdml.dsae_loss.default, (x_hat, x, h, P, y, 0.5, True))
        # With the forward's gradients asked for (all of them, or those of x_hat or h alone).
        for flags in [(True, True), (True, False), (False, True)]:
            torch.library.opcheck(torch.ops.sdml.dsae_loss.default, (x_hat, x, h, P, y, 0.5, True, *flags))
        x_hat, x, h = (t.detach() for t in (x_hat, x, h))
    out = torch.ops.sdml.dsae_loss.default(x_hat, x, h, P, y, 0.5, True)
    g = torch.ones((), dtype=dtype, device=device)
    torch.library.opcheck(
        torch.ops.sdml.dsae_loss_backward.default,
        (g, None, g, out[3].clone(), None, x_hat, x, h, P, y, out[3], out[4], out[5], 0.5, True, True),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x_hat, x, h, P, y = make_inputs(8, 12, 10, 4, torch.float32, device, seed=2, unlabelled=[1])
    enc = torch.nn.Linear(12, 10).to(device)

    def step(x_hat, x, y):
        h = enc(x)
        out = dsae_loss(x_hat, x, h, P, y)
        return out.loss + 0.1 * out.row_sup.sum()

    compiled = torch.compile(step, fullgraph=True)
    x_hat_a = x_hat.clone().requires_grad_()
    x_hat_b = x_hat.clone().requires_grad_()
    eager = step(x_hat_a, x, y)
    eager.backward()
    grads_eager = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    comp = compiled(x_hat_b, x, y)
    comp.backward()
    assert torch.allclose(eager, comp)
    assert torch.allclose(x_hat_a.grad, x_hat_b.grad)
    for a, p in zip(grads_eager, enc.parameters()):
        assert torch.allclose(a, p.grad)


def _loss_and_grads(inputs, threads, weighted=True):
    """Forward outputs and the gradients of x_hat and h, run on ``threads`` threads: of the loss
    plus weighted row norms (the backward kernel), or of the loss alone (the forward's gradients)."""
    x_hat, x, h, P, y = (t.clone().requires_grad_(i in (0, 2)) for i, t in enumerate(inputs))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = dsae_loss(x_hat, x, h, P, y, lam=0.3)
        w = torch.linspace(0.5, 1.5, x_hat.shape[0])
        total = out.loss + (w * out.row_rec).sum() + (w.flip(0) * out.row_sup).sum() if weighted else out.loss
        total.backward()
    finally:
        torch.set_num_threads(before)
    return [t.detach() for t in out] + [x_hat.grad, h.grad]


@pytest.mark.parametrize("weighted", [True, False], ids=["backward_kernel", "forward_grads"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_deterministic_and_thread_count_independent(dtype, weighted):
    # Rows split across threads and several projection tiles (64 rows each) with a ragged last one.
    inputs = make_inputs(257, 301, 64, 10, dtype, "cpu", seed=9, unlabelled=[3, 200], exact_rows=[5])
    one = _loss_and_grads(inputs, 1, weighted)
    assert torch.isfinite(one[-1]).all() and one[-1].abs().sum() > 0
    for threads in (2, 3, 1):
        other = _loss_and_grads(inputs, threads, weighted)
        assert all(torch.equal(a, b) for a, b in zip(one, other)), f"{threads} threads differ from 1"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@requires_cuda
def test_cuda_low_precision_within_eager_error(dtype):
    """Our error vs float64 must not exceed (2x + eps) that of the eager composition run in ``dtype``."""
    inputs = make_inputs(64, 513, 512, 20, torch.float64, "cuda", seed=4, unlabelled=[7])
    low = [t.to(dtype).requires_grad_(i < 3) for i, t in enumerate(inputs)]
    eager_low = [t.to(dtype).requires_grad_(i < 3) for i, t in enumerate(inputs)]
    exact = [t.to(dtype).double().requires_grad_(i < 3) for i, t in enumerate(inputs)]  # same rounded inputs
    ours = dsae_loss(*low)
    ours.loss.backward()
    ref = reference(*exact, 0.5)
    ref[0].backward()
    eager = reference(*eager_low, 0.5)
    eager[0].backward()
    eps = torch.finfo(dtype).eps
    assert rel_err(ours.loss, ref[0].detach()) <= 2 * rel_err(eager[0].detach(), ref[0].detach()) + eps
    for a, b, e in zip(low[:3], exact[:3], eager_low[:3]):
        assert rel_err(a.grad, b.grad) <= 2 * rel_err(e.grad, b.grad) + 4 * eps


@requires_cuda
def test_cuda_matches_cpu_kernel_and_runs_on_current_stream():
    inputs = make_inputs(50, 77, 64, 7, torch.float64, "cpu", seed=8, unlabelled=[1, 2])
    cpu = dsae_loss(*inputs)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = dsae_loss(*[t.cuda() for t in inputs])
    stream.synchronize()
    for a, b in zip(cpu, gpu):
        assert rel_err(b, a) <= 1e-12


# ---- bad input ---------------------------------------------------------------------------------


def _good(device="cpu"):
    return dict(zip(["x_hat", "x", "h", "P", "y"], make_inputs(4, 6, 8, 3, torch.float32, device)))


# How a bad call is made: eagerly on CPU tensors, or on fake tensors (what torch.compile traces
# with), where only the fake implementation's checks can catch it: no kernel runs.
CALL_MODES = ["eager", "fake"]


def _call(mode, op, args):
    if mode == "eager":
        return op(**args)
    with FakeTensorMode() as fake:
        return op(**{k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()})


@pytest.mark.parametrize("mode", CALL_MODES)
@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("x", torch.zeros(4, 7), ValueError, r"x must have shape \[4, 6\], got \[4, 7\]"),
        ("x", torch.zeros(4, 6, 1), ValueError, "x must have shape"),
        ("x_hat", torch.zeros(4, 6, 1), ValueError, "x_hat must be a 2-D"),
        ("x_hat", torch.zeros(0, 6), ValueError, "x_hat has no rows"),
        ("h", torch.zeros(3, 8), ValueError, "h must have one row per row"),
        ("h", torch.zeros(4, 0), ValueError, "h has no columns"),
        ("P", torch.zeros(7, 3), ValueError, "P must be d x c"),
        ("P", torch.zeros(8, 9), ValueError, "c <= d"),
        ("P", torch.zeros(8), ValueError, "P must be a 2-D"),
        ("y", torch.zeros(4, 2), ValueError, "y must have shape"),
        ("y", torch.zeros(4, 3, dtype=torch.int64), TypeError, "y must be a floating-point"),
        ("x_hat", torch.zeros(4, 6, dtype=torch.int32), TypeError, "x_hat must be a floating-point"),
        ("h", torch.zeros(4, 8, dtype=torch.float64), TypeError, r"h has dtype \S+ but x_hat has dtype"),
        ("y", torch.zeros(4, 3, device="meta"), ValueError, "y is on meta but x_hat is on cpu"),
    ],
)
def test_bad_arguments_name_the_argument(name, value, error, match, mode):
    args = _good()
    args[name] = value
    with pytest.raises(error, match=match):
        _call(mode, dsae_loss, args)


@pytest.mark.parametrize("mode", CALL_MODES)
@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_bad_lambda(lam, mode):
    with pytest.raises(ValueError, match="lam must be in"):
        _call(mode, dsae_loss, dict(_good(), lam=lam))


@pytest.mark.parametrize("name", ["x_hat", "x", "h", "P", "y"])
def test_meta_tensor_mixed_with_cpu_is_refused(name):
    """Mixing devices is refused by our own device check, whichever device dispatch picks; before it,
    a meta tensor among CPU ones reached the fake implementation and returned uninitialized memory."""
    args = _good()
    args[name] = args[name].to("meta")
    match = "x is on cpu but x_hat is on meta" if name == "x_hat" else f"{name} is on meta but x_hat is on cpu"
    with pytest.raises(ValueError, match=match):
        dsae_loss(**args)


def test_compile_rejects_bad_shapes_while_tracing():
    """The fake implementation's checks stop torch.compile before a graph reaches the backend."""
    args = _good()
    args["P"] = torch.zeros(8, 9)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda a: dsae_loss(**a).loss, backend=backend, fullgraph=True)
    with pytest.raises(Exception, match="c <= d"):
        compiled(args)
    assert graphs == []


def _backward_args(**overrides):
    """Arguments of dsae_loss_backward for the inputs of _good(), with some replaced."""
    inputs = _good()
    out = torch.ops.sdml.dsae_loss.default(*inputs.values(), 0.5, True)
    g = torch.ones(())
    args = dict(
        grad_loss=g, grad_rec=None, grad_sup=g, grad_row_rec=torch.ones(4), grad_row_sup=None, **inputs,
        row_rec=out[3], row_sup=out[4], n_labelled=out[5], lam=0.5, need_input_grad=True, need_code_grad=True,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize("mode", CALL_MODES)
@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("row_rec", torch.zeros(3), ValueError, r"row_rec must have shape \[4\], got \[3\]"),
        ("row_sup", torch.zeros(4, dtype=torch.float64), TypeError, "row_sup must have dtype"),
        ("n_labelled", torch.zeros(1, dtype=torch.int64), ValueError, "n_labelled must have shape"),
        ("n_labelled", torch.zeros((), dtype=torch.int32), TypeError, "n_labelled must have dtype"),
        ("grad_loss", torch.ones(2), ValueError, "grad_loss must have shape"),
        ("grad_row_sup", torch.ones(5), ValueError, "grad_row_sup must have shape"),
        ("grad_row_rec", torch.ones(4, dtype=torch.int64), TypeError, "grad_row_rec must be a floating-point"),
        ("grad_sup", torch.ones((), device="meta"), ValueError, "grad_sup is on meta but x_hat is on cpu"),
        ("P", torch.zeros(7, 3), ValueError, "P must be d x c"),
    ],
)
def test_backward_op_checks_saved_tensors_and_gradients(name, value, error, match, mode):
    """Called directly, the backward op refuses what would make its kernel read out of bounds."""
    with pytest.raises(error, match=match):
        _call(mode, torch.ops.sdml.dsae_loss_backward.default, _backward_args(**{name: value}))


def test_backward_op_fake_shapes():
    args = _backward_args(need_input_grad=False)
    with FakeTensorMode() as fake:
        gx, gh = torch.ops.sdml.dsae_loss_backward.default(
            **{k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        )
    assert gx.shape == (0, 6) and gh.shape == (4, 8)


def test_fake_tensors_skip_the_finite_check():
    # The finite check reads values: fake tensors have none, so it must not run (or raise) there.
    args = _good()
    args["x"][-1, -1] = float("nan")
    assert _call("fake", dsae_loss, args).loss.shape == ()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["x_hat", "x", "h", "P", "y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_named(name, bad, device):
    args = _good(device)
    args[name] = args[name].clone()
    args[name][-1, -1] = bad
    with pytest.raises(ValueError, match=f"dsae_loss: {name} contains NaN or Inf"):
        dsae_loss(**args)
    # Opting out of the check returns the non-finite loss instead.
    assert not torch.isfinite(dsae_loss(**args, check_finite=False).loss)


def test_overflow_reported():
    args = _good()
    args["x_hat"] = torch.full((4, 6), 3e38)
    args["x"] = -args["x_hat"]
    with pytest.raises(ValueError, match="overflowed"):
        dsae_loss(**args)


@pytest.mark.parametrize("name", ["P", "y"])
def test_constants_must_not_require_grad(name):
    args = _good()
    args[name].requires_grad_()
    with pytest.raises(ValueError, match=f"{name} is a constant"):
        dsae_loss(**args)


@pytest.mark.parametrize("mode", CALL_MODES)
def test_cpu_rejects_half(mode):
    args = {k: v.half() for k, v in _good().items()}
    with pytest.raises(TypeError, match="on CPU x_hat must be float32 or float64"):
        _call(mode, dsae_loss, args)


@requires_cuda
def test_mixed_devices():
    args = _good()
    args["h"] = args["h"].cuda()
    with pytest.raises(ValueError, match="h is on cuda:0 but x_hat is on cpu"):
        dsae_loss(**args)


# ---- CUDA launch plan and limits: host code compiled into every build ---------------------------

# The most rows (a grid row of thread blocks per row: gridDim.x). The kernels keep no row data in
# shared memory, so d + c has no limit.
MAX_ROWS = 2**31 - 1


@pytest.mark.parametrize("B, D, sms", [(4096, 4096, 132), (100, 4096, 132), (1, 100_000, 132), (7, 9, 132), (3, 40_000, 1)])
def test_cuda_plan_fills_the_device_with_aligned_slices(B, D, sms):
    plan = _extension._C.check_dsae_loss_cuda_limits(B, D, 16, 3, sms)
    splits, slice_ = plan["splits"], plan["slice"]
    assert slice_ % 8 == 0  # 16 bytes of the narrowest dtype: every slice of an aligned row is aligned
    assert splits * slice_ >= D and (splits - 1) * slice_ < D  # the slices cover the row, none empty
    min_slice = 8 * plan["threads"]
    if D >= 2 * min_slice:
        assert slice_ >= min_slice - 8  # long enough to be worth a block
    # Enough blocks for every multiprocessor (4 each) unless D is too short to split further.
    assert B * splits >= min(4 * sms, B * max(1, D // min_slice))


def test_cuda_plan_for_the_training_and_benchmark_batches():
    assert _extension._C.check_dsae_loss_cuda_limits(4096, 4096, 64, 10)["splits"] == 1
    small = _extension._C.check_dsae_loss_cuda_limits(100, 4096, 64, 10)
    assert small["splits"] == 2 and 100 * small["splits"] >= 132


def test_cuda_limits_past_the_bounds():
    check = _extension._C.check_dsae_loss_cuda_limits
    assert check(MAX_ROWS, 5, 20_000, 19_000)["splits"] == 1  # no d + c limit
    with pytest.raises(ValueError, match=f"on CUDA x_hat must have at most {MAX_ROWS} rows"):
        check(MAX_ROWS + 1, 5, 8, 2)


def _fake_cuda_call(B, d, c, dtype):
    with FakeTensorMode():
        t = [torch.empty(s, dtype=dtype, device="cuda") for s in ((B, 3), (B, 3), (B, d), (d, c), (B, c))]
        return dsae_loss(*t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_limits_reached_through_the_fake_implementation(dtype):
    """A CUDA call past the limits fails while tracing (fake CUDA tensors need no GPU)."""
    assert _fake_cuda_call(2, 13_000, 12_000, dtype).row_rec.shape == (2,)
    with pytest.raises(ValueError, match="at most 2147483647 rows"):
        _fake_cuda_call(MAX_ROWS + 1, 4, 2, dtype)


@requires_cuda
def test_cuda_kernel_has_no_shared_memory_limit_on_d_plus_c():
    """d + c past the old 48 KiB shared-memory bound (12,280 float32 values): both kernels run and
    agree with the CPU kernel (the case that crashed the old kernels at the bound)."""
    inputs = make_inputs(3, 5, 12_279, 2, torch.float32, "cpu", seed=21)
    for d_cut in (12_278, 12_279):  # d + c at the old bound and past it
        cpu_in = [t.clone() for t in inputs]
        cpu_in[2] = cpu_in[2][:, :d_cut].clone().requires_grad_()
        cpu_in[3] = cpu_in[3][:d_cut].clone()
        gpu_in = [t.cuda() for t in cpu_in]
        gpu_in[2] = gpu_in[2].detach().requires_grad_()
        cpu_out, gpu_out = dsae_loss(*cpu_in), dsae_loss(*gpu_in)
        cpu_out.loss.backward()
        gpu_out.loss.backward()
        assert rel_err(gpu_out.loss, cpu_out.loss) <= 1e-5
        assert rel_err(gpu_in[2].grad, cpu_in[2].grad) <= 1e-5


@requires_cuda
@pytest.mark.parametrize("B, D, offset", [(100, 4096, 0), (100, 4096, 1), (1, 9, 0), (5, 4099, 3), (257, 2048, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_split_rows_and_unaligned_rows_match_cpu(B, D, offset, dtype):
    """Rows split over several blocks (B = 100), 16-byte loads (offset 0) and the scalar path
    (rows starting off a 16-byte boundary) against the CPU kernel in float64."""
    base = make_inputs(B, D + offset, 32, 5, torch.float64, "cpu", seed=B + D, unlabelled=[0])
    ref = [base[0][:, offset:], base[1][:, offset:], base[2], base[3], base[4]]
    ref = [t.clone().requires_grad_(i in (0, 1, 2)) for i, t in enumerate(ref)]
    cuda_full = [t.to("cuda", dtype) for t in base]
    gpu = [cuda_full[0][:, offset:], cuda_full[1][:, offset:], cuda_full[2], cuda_full[3], cuda_full[4]]
    gpu = [t.detach().requires_grad_(i in (0, 1, 2)) for i, t in enumerate(gpu)]
    want, got = dsae_loss(*ref), dsae_loss(*gpu)
    (want.loss + 0.3 * want.row_rec.sum()).backward()
    (got.loss + 0.3 * got.row_rec.sum()).backward()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for a, b in zip(got[:5], want[:5]):
        assert rel_err(a, b) <= tol
    assert int(got.n_labelled) == int(want.n_labelled)
    for a, b in zip(gpu[:3], ref[:3]):
        assert rel_err(a.grad, b.grad) <= tol


# ---- gradients formed in the forward -----------------------------------------------------------


def _op(inputs, lam=0.5, need_input_grad=True, need_code_grad=True):
    return torch.ops.sdml.dsae_loss.default(*inputs, lam, True, need_input_grad, need_code_grad)


def _kernel_grads(inputs, out, lam, grad_loss=1.0):
    """The backward kernel's gradients for an upstream gradient on the loss alone."""
    g = torch.full((), grad_loss, dtype=inputs[0].dtype, device=inputs[0].device)
    return torch.ops.sdml.dsae_loss_backward.default(
        g, None, None, None, None, *inputs, out[3], out[4], out[5], lam, True, True
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_gradients_are_the_backward_kernels_at_unit_upstream(shape, dtype, device):
    """The op contract: asked for them, the forward returns the backward kernel's gradients at
    grad_loss = 1, bit for bit, and the same loss terms as without them."""
    inputs = make_inputs(*shape, dtype, device, seed=sum(shape) + 1, unlabelled=[0], exact_rows=[shape[0] - 1])
    lam = 0.3
    plain = _op(inputs, lam, False, False)
    with_grads = _op(inputs, lam)
    assert plain[6].shape == (0, shape[1]) and plain[7].shape == (0, shape[2])
    assert all(torch.equal(a, b) for a, b in zip(plain[:6], with_grads[:6]))
    want_x_hat, want_h = _kernel_grads(inputs, with_grads, lam)
    assert torch.equal(with_grads[6], want_x_hat) and torch.equal(with_grads[7], want_h)
    only_code = _op(inputs, lam, False, True)
    assert only_code[6].shape == (0, shape[1]) and torch.equal(only_code[7], want_h)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_forward_gradients_of_non_contiguous_inputs(dtype):
    B, D, d, c = 9, 14, 12, 5
    x_hat, x, h, P, y = make_inputs(B, D, d, c, dtype, "cpu", seed=7, unlabelled=[4])
    wide = torch.randn(B, 2 * D, dtype=dtype)
    wide[:, 1::2] = x_hat
    inputs = [wide[:, 1::2], x.t().contiguous().t(), torch.cat([h, h], 1)[:, :d], P.t().contiguous().t(), y.repeat(2, 1)[::2]]
    out = _op(inputs)
    want = _kernel_grads(inputs, out, 0.5)
    assert torch.equal(out[6], want[0]) and torch.equal(out[7], want[1])
    assert torch.equal(out[6], _op([t.contiguous() for t in inputs])[6])


def _ran_backward_kernel(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == "sdml::dsae_loss_backward" for e in prof.events())


def test_loss_backward_hands_on_the_forward_gradients():
    """A plain loss.backward() runs no backward kernel (x_hat and x are read once) and gets the
    same bits as the kernel; an upstream gradient on another output runs the kernel."""
    inputs = make_inputs(40, 33, 16, 4, torch.float32, "cpu", seed=13, unlabelled=[3])

    def grads(total):
        x_hat, x, h, P, y = (t.clone().requires_grad_(i in (0, 2)) for i, t in enumerate(inputs))
        out = dsae_loss(x_hat, x, h, P, y)
        ran = _ran_backward_kernel(lambda: total(out).backward())
        return ran, x_hat.grad, h.grad

    ran_plain, *plain = grads(lambda out: out.loss)
    ran_other, *other = grads(lambda out: out.loss + 0 * out.rec)  # same weights, through the kernel
    assert not ran_plain and ran_other
    assert all(torch.equal(a, b) for a, b in zip(plain, other))


def test_loss_backward_adopts_the_forward_gradient_without_a_copy():
    x_hat, x, h, P, y = make_inputs(64, 100, 8, 3, torch.float32, "cpu", seed=14)
    x_hat.requires_grad_()
    seen = []
    x_hat.register_hook(lambda g: seen.append(g.data_ptr()))
    dsae_loss(x_hat, x, h, P, y).loss.backward()
    assert seen == [x_hat.grad.data_ptr()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_scaled_loss_and_retained_graph(dtype, device):
    """grad_loss != 1 scales the forward's gradients; a second backward through the retained
    graph (the forward's gradients already taken) gives the same bits; neither touches the first
    call's result; both match the reference."""
    inputs = make_inputs(21, 17, 12, 4, dtype, device, seed=15, unlabelled=[2])
    x_hat, x, h, P, y = (t.clone().requires_grad_(i in (0, 2)) for i, t in enumerate(inputs))
    unit = torch.autograd.grad(dsae_loss(x_hat, x, h, P, y, lam=0.4).loss, [x_hat, h])
    out = dsae_loss(x_hat, x, h, P, y, lam=0.4)
    first = torch.autograd.grad(2.7 * out.loss, [x_hat, h], retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(2.7 * out.loss, [x_hat, h])
    for a, b, u, k in zip(first, second, unit, kept):
        assert torch.equal(a, b) and torch.equal(a, k)
        assert torch.equal(a, u * torch.tensor(2.7, dtype=dtype, device=device))
    ref = [t.detach().double().cpu().requires_grad_(i in (0, 2)) for i, t in enumerate(inputs)]
    (2.7 * reference(*ref, 0.4)[0]).backward()
    assert rel_err(first[0], ref[0].grad) <= REL_TOL[dtype] and rel_err(first[1], ref[2].grad) <= REL_TOL[dtype]


def test_direct_op_call_without_forward_gradients():
    """Called through torch.ops without asking for them, the loss-only backward forms the unit
    gradient with the kernel: the same bits as the Python face's."""
    inputs = make_inputs(12, 9, 8, 3, torch.float64, "cpu", seed=16)
    a = [t.clone().requires_grad_(i in (0, 2)) for i, t in enumerate(inputs)]
    b = [t.clone().requires_grad_(i in (0, 2)) for i, t in enumerate(inputs)]
    (3.0 * torch.ops.sdml.dsae_loss.default(*a, 0.5, True)[0]).backward()
    (3.0 * dsae_loss(*b).loss).backward()
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[2].grad, b[2].grad)


def test_direct_op_call_keeps_its_gradient_outputs():
    """A direct op call that asked for the forward's gradients holds them: a scaled backward must
    not scale them in place under it."""
    inputs = make_inputs(12, 9, 8, 3, torch.float64, "cpu", seed=16)
    x_hat, x, h, P, y = (t.clone().requires_grad_(i in (0, 2)) for i, t in enumerate(inputs))
    out = torch.ops.sdml.dsae_loss.default(x_hat, x, h, P, y, 0.5, True, True, True)
    kept = [out[6].clone(), out[7].clone()]
    (3.0 * out[0]).backward()
    assert torch.equal(out[6], kept[0]) and torch.equal(out[7], kept[1])
    assert torch.equal(x_hat.grad, 3.0 * kept[0]) and torch.equal(h.grad, 3.0 * kept[1])


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_x_alone(device):
    x_hat, x, h, P, y = make_inputs(5, 8, 6, 2, torch.float64, device, seed=17)
    x.requires_grad_()
    dsae_loss(x_hat, x, h, P, y).loss.backward()
    x_hat.requires_grad_()
    x.grad, grad = None, torch.autograd.grad(dsae_loss(x_hat, x.detach(), h, P, y).loss, x_hat)[0]
    dsae_loss(x_hat.detach(), x, h, P, y).loss.backward()
    assert torch.equal(x.grad, -grad)


class _RecordFlags(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the need_input_grad / need_code_grad of each sdml::dsae_loss call."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.sdml.dsae_loss.default:
            # Arguments equal to their defaults (False) may be left off the call.
            passed = dict(zip([a.name for a in func._schema.arguments], args), **(kwargs or {}))
            self.flags.append((passed.get("need_input_grad", False), passed.get("need_code_grad", False)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "requires, context, want",
    [
        ((), None, (False, False)),
        ((0,), None, (True, False)),
        ((1,), None, (True, False)),
        ((2,), None, (False, True)),
        ((0, 2), None, (True, True)),
        ((0, 2), torch.no_grad, (False, False)),
        ((0, 2), torch.inference_mode, (False, False)),
    ],
)
def test_forward_gradients_asked_for_only_when_autograd_needs_them(requires, context, want):
    inputs = [t.requires_grad_(i in requires) for i, t in enumerate(make_inputs(4, 6, 5, 2, torch.float32, "cpu"))]
    recorder = _RecordFlags()
    with (context() if context else torch.enable_grad()), recorder:
        dsae_loss(*inputs)
    assert recorder.flags == [want]


def test_gradcheck_of_a_scaled_loss():
    """gradcheck runs each backward twice and demands identical bits: the second one (the forward's
    gradients already taken) must repeat the first."""
    x_hat, x, h, P, y = make_inputs(6, 7, 5, 3, torch.float64, "cpu", seed=18, unlabelled=[1])
    args = [t.requires_grad_() for t in (x_hat, x, h)]
    assert torch.autograd.gradcheck(lambda a, b, c: 0.37 * dsae_loss(a, b, c, P, y, lam=0.6).loss, args)


@pytest.mark.parametrize("stream", ["0", "1"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_streaming_stores_give_the_same_bits(stream, dtype, monkeypatch):
    """Ordinary and streaming stores write the same values: odd row lengths put the rows at every
    alignment (the unaligned head and the tail take ordinary stores)."""
    for B, D in [(1, 1), (3, 7), (17, 33), (9, 301), (5, 1027)]:
        inputs = make_inputs(B, D, 8, 3, dtype, "cpu", seed=B + D, unlabelled=[0])
        monkeypatch.delenv("SDML_LOSS_STREAM", raising=False)
        monkeypatch.setenv("SDML_LOSS_STREAM", "1" if stream == "0" else "0")
        other = _op(inputs)
        other_kernel = _kernel_grads(inputs, other, 0.5, 2.5)
        monkeypatch.setenv("SDML_LOSS_STREAM", stream)
        assert sdml_ext.build_info()["cpu_loss_stores"].startswith(
            ("streaming stores" if stream == "1" else "ordinary stores", "ordinary stores (this CPU")
        )
        out = _op(inputs)
        assert torch.equal(out[6], other[6]) and torch.equal(_kernel_grads(inputs, out, 0.5, 2.5)[0], other_kernel[0])


def test_bad_stream_override(monkeypatch):
    monkeypatch.setenv("SDML_LOSS_STREAM", "yes")
    with pytest.raises(ValueError, match="SDML_LOSS_STREAM must be 0"):
        _op(make_inputs(2, 3, 4, 2, torch.float32, "cpu"))


def test_torch_compile_plain_and_scaled_loss_backward():
    x_hat, x, h, P, y = make_inputs(8, 12, 10, 4, torch.float32, "cpu", seed=19, unlabelled=[1])
    enc = torch.nn.Linear(12, 10)

    def step(x_hat, x, y, scale):
        return scale * dsae_loss(x_hat, x, enc(x), P, y).loss

    compiled = torch.compile(step, fullgraph=True)
    for scale in (1.0, 2.5):
        grads = []
        for fn in (step, compiled):
            xh = x_hat.clone().requires_grad_()
            enc.zero_grad()
            fn(xh, x, y, scale).backward()
            grads.append([xh.grad] + [p.grad.clone() for p in enc.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


def test_fake_forward_gradient_shapes():
    inputs = _good()
    with FakeTensorMode() as fake:
        fakes = [fake.from_tensor(t) for t in inputs.values()]
        out = torch.ops.sdml.dsae_loss.default(*fakes, 0.5, True, True, False)
    assert out[6].shape == (4, 6) and out[7].shape == (0, 8)


@requires_cuda
def test_cuda_forward_gradients_are_the_backward_kernels_at_unit_upstream():
    inputs = make_inputs(100, 4099, 64, 7, torch.float32, "cuda", seed=20, unlabelled=[3])
    out = _op(inputs)
    want = _kernel_grads(inputs, out, 0.5)
    assert torch.equal(out[6], want[0]) and torch.equal(out[7], want[1])
    x_hat, x, h, P, y = (t.clone().requires_grad_(i in (0, 2)) for i, t in enumerate(inputs))
    (2.5 * dsae_loss(x_hat, x, h, P, y).loss).backward()
    assert torch.equal(x_hat.grad, out[6] * 2.5) and torch.equal(h.grad, out[7] * 2.5)


# ---- the module --------------------------------------------------------------------------------


def test_module_accepts_class_ids_and_casts():
    x_hat, x, h, P, y = make_inputs(6, 5, 8, 3, torch.float64, "cpu", unlabelled=[4])
    ids = torch.where(y.any(1), y.argmax(1), torch.full((6,), -1))
    module = DSAELoss(P.float(), lam=0.25)
    by_ids = module(x_hat, x, h, ids)
    by_rows = dsae_loss(x_hat, x, h, P.float().double(), y, lam=0.25)
    assert all(torch.equal(a, b) for a, b in zip(by_ids, by_rows))
    assert "d=8, c=3, lam=0.25" in repr(module)


@pytest.mark.parametrize("ids, match", [(torch.tensor([0, 1, 3, 0, 1, 2]), r"in \[-1, 3\)"), (torch.tensor([0, -2, 1, 0, 1, 2]), "got -2")])
def test_module_rejects_bad_class_ids(ids, match):
    x_hat, x, h, P, _ = make_inputs(6, 5, 8, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        DSAELoss(P)(x_hat, x, h, ids)


def test_module_rejects_bad_projection_and_lambda():
    with pytest.raises(ValueError, match="c <= d"):
        DSAELoss(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="lam"):
        DSAELoss(torch.zeros(4, 3), lam=2.0)


def test_large_gradients_reuse_cached_blocks_without_aliasing():
    # 1024 x 2048 float32 = 8 MiB: above the size the block cache serves.
    x_hat, x, h, P, y = make_inputs(1024, 2048, 16, 3, torch.float32, "cpu", seed=12)
    x_hat.requires_grad_()
    first = torch.autograd.grad(dsae_loss(x_hat, x, h, P, y).loss, x_hat)[0]
    kept = first.clone()
    second = torch.autograd.grad(dsae_loss(x_hat, x * 0.5, h, P, y).loss, x_hat)[0]
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, kept)
    del first, second, kept
    assert sdml_ext.release_cached_host_buffers() >= 2 * 8 << 20
    assert sdml_ext.release_cached_host_buffers() == 0
