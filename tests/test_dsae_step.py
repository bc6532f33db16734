"""The DSAE training-step kernels (sdml::dense_forward, dense_input_grad, dense_bias_act,
normalize_rows(_backward), dense_grad, adam_update, linear_weight_grad_adam) against plain PyTorch references on awkward shapes:
float64 gradchecks of the hand-written derivatives, Adam against torch's fused Adam, results
independent of the thread count, opcheck, bad input eagerly and on fake tensors."""

import platform

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

from sdml_ext.ops import dsae_step as ds

DTYPES = [torch.float32, torch.float64]
# Row blocks: one row, one column, odd widths, a width past a column block (64), the paper's.
SHAPES = [(1, 1), (1, 7), (3, 65), (5, 130), (100, 1024)]
REL_TOL = {torch.float32: 2e-6, torch.float64: 1e-13}
# torch's fused CPU Adam runs its vector code on all but a tensor's last numel % 16 elements;
# adam_math.h reproduces that arithmetic as torch's x86 build rounds it.
VECTOR = 16
X86 = platform.machine() in ("x86_64", "AMD64")
HYPER = [dict(lr=1e-3, beta1=0.5, beta2=0.999, eps=1e-8), dict(lr=3e-4, beta1=0.9, beta2=0.99, eps=1e-6)]


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def close(a, b, dtype):
    a, b = a.double(), b.double()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= REL_TOL[dtype] * max(float(b.abs().max()) if b.numel() else 0.0, 1e-30), err


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_dense_bias_act_is_bias_then_relu(shape, dtype, relu):
    z, b = rand(*shape, dtype=dtype, seed=1), rand(shape[1], dtype=dtype, seed=2)
    z[0, 0] = -b[0]  # exactly zero after the bias
    out = z.clone()
    ds.dense_bias_act(out, b, relu)
    expected = z + b
    assert torch.equal(out, torch.relu(expected) if relu else expected)


# Linear layers: one row, one column, odd widths, n_out and n_in past one and several 128-column
# tiles and not a multiple of them, the paper's widths.
LINEAR = [(1, 1, 1), (1, 3, 17), (3, 129, 5), (7, 130, 1030), (100, 257, 2050), (100, 1024, 4096)]


def gemm_close(ours, expected, a, b, dtype, slack=0.0):
    """ours ~ expected = a @ b (+ terms worth ``slack``, all in float64) within the rounding of a
    float GEMM: per element k * eps * (|a| @ |b|) + slack, k the inner size."""
    bound = (a.double().abs() @ b.double().abs()) * (a.shape[1] * torch.finfo(dtype).eps) + slack
    err = (ours.double() - expected).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n_out,n_in", LINEAR)
@pytest.mark.parametrize("relu", [False, True])
def test_dense_forward_is_linear_then_relu(B, n_out, n_in, dtype, relu):
    x, w = rand(B, n_in, dtype=dtype, seed=40), rand(n_out, n_in, dtype=dtype, seed=41)
    b = rand(n_out, dtype=dtype, seed=42)
    out = torch.full((B, n_out), float("nan"), dtype=dtype)  # every element must be written
    ds.dense_forward(x, w, b, relu, out)
    expected = x.double() @ w.double().t() + b.double()
    # ReLU is 1-Lipschitz: the GEMM's bound holds after it, and nothing below zero survives it.
    gemm_close(out, torch.relu(expected) if relu else expected, x, w.t(), dtype,
               slack=b.double().abs() * torch.finfo(dtype).eps)
    if relu:
        assert bool((out >= 0).all())
        assert bool((out[expected < -1e-3] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n_out,n_in", LINEAR)
@pytest.mark.parametrize("accumulate", [False, True])
def test_dense_input_grad_is_grad_out_times_weight(B, n_out, n_in, dtype, accumulate):
    go, w = rand(B, n_out, dtype=dtype, seed=43), rand(n_out, n_in, dtype=dtype, seed=44)
    before = rand(B, n_in, dtype=dtype, seed=45)
    grad_input = before.clone() if accumulate else torch.full((B, n_in), float("nan"), dtype=dtype)
    ds.dense_input_grad(go, w, grad_input, accumulate)
    expected = go.double() @ w.double()
    slack = 0.0
    if accumulate:  # the sum adds one rounding of |before|
        expected = expected + before.double()
        slack = 2 * before.double().abs() * torch.finfo(dtype).eps
    gemm_close(grad_input, expected, go, w, dtype, slack)


def test_dense_forward_and_input_grad_match_autograd_in_float64():
    """The two GEMMs are a Linear layer's forward and input gradient: gradcheck the composition."""
    w, b = rand(9, 13, seed=46), rand(9, seed=47)

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out = x.new_empty(x.shape[0], 9)
            ds.dense_forward(x.detach().contiguous(), w, b, False, out)
            return out

        @staticmethod
        def backward(ctx, grad):
            gi = grad.new_empty(grad.shape[0], 13)
            ds.dense_input_grad(grad.contiguous(), w, gi)
            return gi

    assert torch.autograd.gradcheck(Linear.apply, (rand(4, 13, seed=48).requires_grad_(),))


def _rows_with_edges(shape, dtype, seed):
    """Random rows, with (when there are enough rows) a zero row and one below eps = 1e-12."""
    v = rand(*shape, dtype=dtype, seed=seed)
    if shape[0] >= 3:
        v[1] = 0
        v[2] = 1e-14
    return v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_normalize_rows_is_f_normalize(shape, dtype):
    v = _rows_with_edges(shape, dtype, 3)
    out, norm = torch.empty_like(v), torch.empty(shape[0], dtype=dtype)
    ds.normalize_rows(v, 1e-12, out, norm)
    close(out, F.normalize(v.double(), dim=1), dtype)
    close(norm, torch.linalg.vector_norm(v.double(), dim=1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sums", [False, True])
def test_normalize_rows_backward_is_autograds_derivative(shape, dtype, sums):
    v = _rows_with_edges(shape, dtype, 4)
    g = rand(*shape, dtype=dtype, seed=5)
    out, norm = torch.empty_like(v), torch.empty(shape[0], dtype=dtype)
    ds.normalize_rows(v, 1e-12, out, norm)
    grad_input = torch.empty_like(v)
    column_sums = torch.empty(shape[1], dtype=dtype) if sums else None
    ds.normalize_rows_backward(g, out, norm, 1e-12, grad_input, column_sums)
    v64 = v.double().requires_grad_()
    F.normalize(v64, dim=1).backward(g.double())
    # The g / eps rows (norm below eps) are ~1e12 times the others: compare row by row.
    for j in range(shape[0]):
        close(grad_input[j], v64.grad[j], dtype)
    if sums:
        close(column_sums, grad_input.double().sum(0), dtype)


def test_normalize_rows_backward_may_overwrite_its_gradient():
    v, g = rand(6, 33, seed=6), rand(6, 33, seed=7)
    out, norm = torch.empty_like(v), torch.empty(6, dtype=v.dtype)
    ds.normalize_rows(v, 1e-12, out, norm)
    expected = torch.empty_like(v)
    ds.normalize_rows_backward(g, out, norm, 1e-12, expected)
    ds.normalize_rows_backward(g, out, norm, 1e-12, g)
    assert torch.equal(g, expected)


class _Normalize(torch.autograd.Function):
    """normalize_rows with normalize_rows_backward as its derivative, for gradcheck."""

    @staticmethod
    def forward(ctx, v):
        out, norm = torch.empty_like(v), v.new_empty(v.shape[0])
        ds.normalize_rows(v, 1e-12, out, norm)
        ctx.save_for_backward(out, norm)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, norm = ctx.saved_tensors
        grad_input = torch.empty_like(grad)
        ds.normalize_rows_backward(grad.contiguous(), out, norm, 1e-12, grad_input)
        return grad_input


class _Dense(torch.autograd.Function):
    """A ReLU layer's bias-and-activation pass with dense_grad as its derivative (the mask and
    the bias gradient), for gradcheck."""

    @staticmethod
    def forward(ctx, z, b):
        out = z.clone()
        ds.dense_bias_act(out, b, True)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        grad = grad.contiguous().clone()
        grad_bias = grad.new_empty(grad.shape[1])
        ds.dense_grad(grad, out, grad_bias)
        return grad, grad_bias


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (4, 9), (3, 70)])
def test_gradcheck_float64(shape):
    v = rand(*shape, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(_Normalize.apply, (v,))
    z = rand(*shape, seed=9)
    z = torch.where(z.abs() < 0.05, z + 0.2, z).requires_grad_()  # away from the ReLU's kink
    b = torch.zeros(shape[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Dense.apply, (z, b))


# ---- backward passes ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_dense_grad_is_threshold_backward_and_column_sums(shape, dtype, relu):
    grad, act = rand(*shape, dtype=dtype, seed=10), torch.relu(rand(*shape, dtype=dtype, seed=11))
    expected = torch.ops.aten.threshold_backward(grad, act, 0) if relu else grad.clone()
    gb = torch.empty(shape[1], dtype=dtype)
    ds.dense_grad(grad, act if relu else None, gb)
    assert torch.equal(grad, expected)
    close(gb, expected.double().sum(0), dtype)


# ---- Adam -----------------------------------------------------------------------------------


def torch_adam(p, g, m, v, step, hyper):
    torch._fused_adam_([p], [g], [m], [v], [], [torch.tensor(float(step))], lr=hyper["lr"], beta1=hyper["beta1"],
                       beta2=hyper["beta2"], weight_decay=0.0, eps=hyper["eps"], amsgrad=False, maximize=False)


def assert_adam_equal(ours, theirs, n, dtype):
    """Bitwise on torch's vector part (on x86, whose rounding adam_math.h reproduces), to an
    ulp-level tolerance on its scalar tail."""
    vec = n - n % VECTOR if X86 else 0
    for a, b in zip(ours, theirs):
        a, b = a.flatten(), b.flatten()
        assert torch.equal(a[:vec], b[:vec])
        torch.testing.assert_close(a[vec:], b[vec:], rtol=8 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 15, 16, 1000, 4099])
@pytest.mark.parametrize("hyper", HYPER)
def test_adam_update_is_torchs_fused_adam(n, dtype, hyper):
    p, g, m = rand(n, dtype=dtype, seed=12), rand(n, dtype=dtype, seed=13), rand(n, dtype=dtype, seed=14, scale=0.1)
    v = rand(n, dtype=dtype, seed=15, scale=0.1).abs()
    g[0] = 0  # a zero gradient
    ours, theirs = [t.clone() for t in (p, m, v)], [t.clone() for t in (p, m, v)]
    for step in (1, 2, 9):
        ds.adam_update(ours[0], g, ours[1], ours[2], step=step, **hyper)
        torch_adam(*theirs[:1], g, *theirs[1:], step, hyper)
        assert_adam_equal(ours, theirs, n, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n_out,n_in", [(1, 1, 1), (1, 3, 17), (7, 130, 1030), (100, 257, 2050)])
def test_linear_weight_grad_adam_is_the_gradient_then_adam(B, n_out, n_in, dtype):
    """Tiles across both dimensions and partial ones: the gradient is grad_out^T input, and the
    weights and moments are exactly Adam's on that gradient."""
    go, x = rand(B, n_out, dtype=dtype, seed=16), rand(B, n_in, dtype=dtype, seed=17)
    w, m = rand(n_out, n_in, dtype=dtype, seed=18), rand(n_out, n_in, dtype=dtype, seed=19, scale=0.1)
    v = rand(n_out, n_in, dtype=dtype, seed=20, scale=0.1).abs()
    hyper = HYPER[0]
    ours = [t.clone() for t in (w, m, v)]
    grad = torch.full((n_out, n_in), float("nan"), dtype=dtype)
    ds.linear_weight_grad_adam(go, x, *ours, step=3, grad_weight=grad, **hyper)
    close(grad, go.double().t() @ x.double(), dtype)
    mine = [t.clone() for t in (w, m, v)]
    ds.adam_update(mine[0], grad, mine[1], mine[2], step=3, **hyper)
    assert all(torch.equal(a, b) for a, b in zip(ours, mine))
    theirs = [t.clone() for t in (w, m, v)]
    torch_adam(theirs[0], grad, theirs[1], theirs[2], 3, hyper)
    for row in range(n_out):  # torch's vector part is per row here: the tiles are rows' segments
        assert_adam_equal([t[row] for t in ours], [t[row] for t in theirs], n_in if n_in % VECTOR == 0 else 0, dtype)
    # Without grad_weight the update is the same.
    again = [t.clone() for t in (w, m, v)]
    ds.linear_weight_grad_adam(go, x, *again, step=3, **hyper)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))


def test_results_do_not_depend_on_the_thread_count(threads):
    go, x = rand(100, 300, dtype=torch.float32, seed=21), rand(100, 2100, dtype=torch.float32, seed=22)
    w = rand(300, 2100, dtype=torch.float32, seed=23)
    z = rand(100, 2100, dtype=torch.float32, seed=24)
    b = rand(2100, dtype=torch.float32, seed=25)

    def run():
        state = [w.clone(), torch.zeros_like(w), torch.zeros_like(w)]
        grad = torch.empty_like(w)
        ds.linear_weight_grad_adam(go, x, *state, step=1, grad_weight=grad, **HYPER[0])
        out, norm = torch.empty_like(z), torch.empty(100)
        ds.normalize_rows(z, 1e-12, out, norm)
        gi, sums = torch.empty_like(z), torch.empty(2100)
        ds.normalize_rows_backward(x, out, norm, 1e-12, gi, sums)
        masked, gb = x.clone(), torch.empty(2100)
        ds.dense_grad(masked, torch.relu(z), gb)
        act = z.clone()
        ds.dense_bias_act(act, b, True)
        flat = [t.flatten().clone() for t in state]
        ds.adam_update(flat[0], grad.flatten(), flat[1], flat[2], step=2, **HYPER[1])
        # Past several 128-column tiles each way: out [100, 300] and grad_input [100, 2100].
        lin = torch.empty(100, 300)
        ds.dense_forward(x, w, b[:300], True, lin)
        gin = z.clone()
        ds.dense_input_grad(go, w, gin, accumulate=True)
        return [*state, grad, out, norm, gi, sums, masked, gb, act, *flat, lin, gin]

    torch.set_num_threads(1)
    one = run()
    torch.set_num_threads(3)
    assert all(torch.equal(a, b) for a, b in zip(one, run()))


# ---- opcheck and bad input ------------------------------------------------------------------


def _calls(dtype=torch.float32):
    """One valid call of every op: (op, args)."""
    B, n_in, n_out = 5, 9, 6
    z, b = rand(B, n_out, dtype=dtype, seed=30), rand(n_out, dtype=dtype, seed=31)
    out, norm = torch.empty_like(z), torch.empty(B, dtype=dtype)
    ds.normalize_rows(z, 1e-12, out, norm)
    go, x = rand(B, n_out, dtype=dtype, seed=32), rand(B, n_in, dtype=dtype, seed=33)
    w = rand(n_out, n_in, dtype=dtype, seed=34)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    sdml = torch.ops.sdml
    return [
        (sdml.dense_bias_act.default, (z.clone(), b, True)),
        (sdml.normalize_rows.default, (z, 1e-12, torch.empty_like(z), torch.empty(B, dtype=dtype))),
        (sdml.normalize_rows_backward.default, (go, out, norm, 1e-12, torch.empty_like(z), torch.empty(n_out, dtype=dtype))),
        (sdml.normalize_rows_backward.default, (go, out, norm, 1e-12, torch.empty_like(z), None)),
        (sdml.dense_grad.default, (go.clone(), torch.relu(z), torch.empty(n_out, dtype=dtype))),
        (sdml.dense_grad.default, (go.clone(), None, torch.empty(n_out, dtype=dtype))),
        (sdml.adam_update.default, (w.flatten().clone(), x.new_ones(n_out * n_in), m.flatten().clone(),
                                    v.flatten().clone(), 1e-3, 0.5, 0.999, 1e-8, 1.0)),
        (sdml.linear_weight_grad_adam.default, (go, x, w.clone(), m.clone(), v.clone(), 1e-3, 0.5, 0.999, 1e-8, 1.0,
                                                torch.empty_like(w))),
        (sdml.linear_weight_grad_adam.default, (go, x, w.clone(), m.clone(), v.clone(), 1e-3, 0.5, 0.999, 1e-8, 2.0,
                                                None)),
        (sdml.dense_forward.default, (x, w, b, True, torch.empty_like(z))),
        (sdml.dense_input_grad.default, (go, w, torch.empty_like(x), False)),
        (sdml.dense_input_grad.default, (go, w, x.clone(), True)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    for op, args in _calls(dtype):
        torch.library.opcheck(op, args)


def _bad(calls):
    """(op, args, error, message) for bad versions of the valid calls."""
    (bias_act, (z, b, _)), (norm_op, nargs), (nb_op, nbargs), _, (dg_op, dgargs), _, (adam_op, aargs), \
        (lwg_op, largs), _, (fwd_op, fargs), (ig_op, igargs), _ = calls
    half = z.half()
    return [
        (bias_act, (z, b[:-1], True), ValueError, r"dense_bias_act: bias must have shape \[6\], got \[5\]"),
        (bias_act, (z.t(), b[:5], True), ValueError, "dense_bias_act: out must be contiguous"),
        (bias_act, (z.flatten(), b, True), ValueError, "dense_bias_act: out must be a 2-D tensor"),
        (bias_act, (half, b.half(), True), TypeError, "dense_bias_act: out must be float32 or float64"),
        (bias_act, (z, b.double() if z.dtype == torch.float32 else b.float(), True), TypeError,
         "dense_bias_act: bias has dtype"),
        (bias_act, (z[:0], b, True), ValueError, "dense_bias_act: out must have rows and columns"),
        (norm_op, (nargs[0], -1.0, *nargs[2:]), ValueError, "normalize_rows: eps must be finite and >= 0"),
        (norm_op, (nargs[0], 1e-12, nargs[2], nargs[3][:-1]), ValueError, "normalize_rows: norm must have shape"),
        (nb_op, (*nbargs[:4], nbargs[4][:, :-1].contiguous(), nbargs[5]), ValueError,
         "normalize_rows_backward: grad_input must have shape"),
        (nb_op, (*nbargs[:5], nbargs[5][:-1]), ValueError, "normalize_rows_backward: column_sums must have shape"),
        (dg_op, (dgargs[0], dgargs[1][:-1], dgargs[2]), ValueError, "dense_grad: activation must have shape"),
        (adam_op, (*aargs[:4], 0.0, *aargs[5:]), ValueError, "adam_update: lr must be positive"),
        (adam_op, (*aargs[:5], 1.0, *aargs[6:]), ValueError, r"adam_update: beta1 must be in \[0, 1\)"),
        (adam_op, (*aargs[:8], 0.0), ValueError, "adam_update: step must be a whole number >= 1"),
        (adam_op, (*aargs[:8], 1.5), ValueError, "adam_update: step must be a whole number >= 1"),
        (adam_op, (aargs[0], aargs[1][:-1], *aargs[2:]), ValueError, "adam_update: grad must have shape"),
        (lwg_op, (largs[0], largs[1][:-1], *largs[2:]), ValueError, "linear_weight_grad_adam: input must be"),
        (lwg_op, (*largs[:2], largs[2].t(), *largs[3:]), ValueError, "linear_weight_grad_adam: weight must have shape"),
        (lwg_op, (*largs[:10], largs[10][:-1]), ValueError, "linear_weight_grad_adam: grad_weight must have shape"),
        (lwg_op, (*largs[:7], 1.0, *largs[8:]), ValueError, r"linear_weight_grad_adam: beta2 must be in \[0, 1\)"),
        (fwd_op, (fargs[0], fargs[1][:, :-1], *fargs[2:]), ValueError,
         r"dense_forward: weight must be \[n_out, n_in\] with n_in = 9 \(input's columns\)"),
        (fwd_op, (fargs[0], fargs[1][:0], fargs[2][:0], *fargs[3:]), ValueError, "dense_forward: weight must be"),
        (fwd_op, (*fargs[:2], fargs[2][:-1], *fargs[3:]), ValueError, r"dense_forward: bias must have shape \[6\]"),
        (fwd_op, (*fargs[:4], fargs[4].t()), ValueError, r"dense_forward: out must have shape \[5, 6\]"),
        (fwd_op, (fargs[0].t().contiguous().t(), *fargs[1:]), ValueError, "dense_forward: input must be contiguous"),
        (fwd_op, (fargs[0], fargs[1].half(), *fargs[2:]), TypeError, "dense_forward: weight must be float32 or"),
        (fwd_op, (fargs[0][:0], *fargs[1:]), ValueError, "dense_forward: input must have rows and columns"),
        (ig_op, (igargs[0], igargs[1][:-1], *igargs[2:]), ValueError,
         r"dense_input_grad: weight must be \[n_out, n_in\] with n_out = 6 \(grad_out's columns\)"),
        (ig_op, (*igargs[:2], igargs[2][:, :-1].contiguous(), igargs[3]), ValueError,
         r"dense_input_grad: grad_input must have shape \[5, 9\]"),
        (ig_op, (igargs[0], igargs[1].t().contiguous().t(), *igargs[2:]), ValueError,
         "dense_input_grad: weight must be contiguous"),
        (ig_op, (igargs[0].flatten(), *igargs[1:]), ValueError, "dense_input_grad: grad_out must be a 2-D tensor"),
    ]


def test_bad_input_names_the_argument():
    for op, args, error, message in _bad(_calls()):
        with pytest.raises(error, match=message):
            op(*args)


def test_dense_outputs_must_not_share_memory_with_their_operands():
    """The GEMM reads its operands while it writes: an aliased output would read half-written
    values. Checked eagerly only (fake tensors have no memory to compare)."""
    x, w, b = rand(4, 4, dtype=torch.float32), rand(4, 4, dtype=torch.float32, seed=1), torch.zeros(4)
    with pytest.raises(ValueError, match="dense_forward: out must not share memory with input"):
        ds.dense_forward(x, w, b, False, x)
    with pytest.raises(ValueError, match="dense_forward: out must not share memory with weight"):
        ds.dense_forward(x, w, b, False, w)
    with pytest.raises(ValueError, match="dense_input_grad: grad_input must not share memory with grad_out"):
        ds.dense_input_grad(x, w, x, True)
    with pytest.raises(ValueError, match="dense_input_grad: grad_input must not share memory with weight"):
        ds.dense_input_grad(x, w, w)


def test_bad_input_on_fake_tensors():
    bad = _bad(_calls())
    with FakeTensorMode() as mode:
        for op, args, error, message in bad:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(error, match=message):
                op(*fake)
