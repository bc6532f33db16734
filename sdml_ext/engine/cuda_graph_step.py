"""Training steps replayed from CUDA graphs: one modality's trainer at the GPU's speed, not at the
speed at which Python can launch kernels.

A training step of the DSAE is ~30 small kernels (six GEMMs forward, twelve backward, the fused
loss, the fused Adam update); on a GPU each launch costs more host time than the kernel takes, so
an eager step is launch-bound. :class:`GraphTraining` captures the whole step (batch gathering,
forward, fused loss, backward, fused Adam with ``capturable=True``, the epoch's loss sums) once
into a CUDA graph and replays it, and likewise the validation pass. Nothing inside an epoch
reads a value back to the host: the batch's rows come from the epoch's permutation and a step
counter that live on the device, so the host only launches replays; the epoch's losses are read
once, at its end.

Same seed, same model as the eager path (:class:`sdml_ext.engine.training.ModalityTrainer` without
graphs, the reference and the CPU path), by construction:

- the permutation is drawn by the trainer's own CPU generator, exactly as the eager path draws
  it, and uploaded once per epoch (asynchronously, from pinned memory: a few KiB) into the
  device buffer the graph reads; a step takes rows ``perm[j*b : (j+1)*b]``, as eager does;
- the step is the eager step's ops in the eager step's order (fused Adam ignores
  ``capturable``: the update's arithmetic is the same);
- capturing needs warm-up steps (they create the optimizer's state and the libraries' handles
  outside the graph); they run on a snapshot of the weights and Adam state that is written back
  in place afterwards, so they leave no trace in the model.

Checkpoints: at an epoch boundary everything the graphs hold is either the trainer's state that
:meth:`~sdml_ext.engine.training.ModalityTrainer.state` saves (weights and Adam state, updated in place
by the replays) or rebuilt at the next epoch (the permutation buffer, the step counter, the loss
sums). A restored trainer drops its graphs (the optimizer's state tensors were replaced) and
captures them again at its next step, so ``--resume`` continues bit for bit.

On the CPU there are no CUDA graphs: :class:`GraphTraining` then runs the very step and
validation functions it would capture, as plain calls (warm-up and snapshot included). That is
how the tests check the host-side logic of this path on machines without a GPU; it is never
chosen automatically. ``SDML_CUDA_GRAPHS=0`` keeps CUDA training on the eager path.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch
from torch import Tensor

ENV = "SDML_CUDA_GRAPHS"
WARMUP_STEPS = 2  # before capture (the PyTorch recipe): the optimizer's state, cuBLAS handles, workspaces
VAL_CHUNK = 2048  # rows per forward pass of the validation split (the eager path's _EVAL_CHUNK)

# One capture at a time in this process: trainers on parallel streams (one thread each) capture
# their graphs when they start; captures are brief, and serialising them keeps one thread's
# capture from seeing another's allocations or stream work ("thread_local" mode lets the other
# threads go on launching their own, uncaptured, work meanwhile).
_CAPTURE_LOCK = threading.Lock()


def graphs_enabled(device: torch.device, requested: bool | None = None) -> bool:
    """Whether a trainer on `device` takes the graph path. ``requested``: None (automatic:
    CUDA devices, unless ``SDML_CUDA_GRAPHS=0``), True (also on the CPU, where the steps run
    uncaptured: for tests) or False (the eager path)."""
    if requested is not None:
        return bool(requested)
    if device.type != "cuda":
        return False
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true", "no", "yes", ""):
        raise ValueError(f"{ENV} must be 1 (CUDA graphs, the default) or 0 (eager steps), got {value!r}")
    return value not in ("0", "off", "false", "no")


class StaticBatches:
    """The epoch's permutation and the step counter, on the device, at fixed addresses a
    captured step reads: :meth:`rows` gives step j's rows ``perm[j*b : (j+1)*b]`` and advances
    the counter, all on the device.

    Args:
        n: training rows; batch: rows per step; device: where the buffers live.
    """

    def __init__(self, n: int, batch: int, device: torch.device):
        self.n, self.batch, self.device = int(n), int(batch), torch.device(device)
        self.perm = torch.arange(self.n, dtype=torch.int64, device=self.device)  # any valid rows until loaded
        self.counter = torch.zeros((), dtype=torch.int64, device=self.device)  # steps taken this epoch
        self._offsets = torch.arange(self.batch, dtype=torch.int64, device=self.device)
        self.steps_taken = 0  # the host's count of the same (no read-back)

    def load(self, perm: Tensor) -> None:
        """Start an epoch with permutation `perm` ([n] int64, on the CPU, as the trainer's
        generator drew it): one asynchronous upload, then the counter is reset on the device."""
        if perm.shape != (self.n,) or perm.dtype != torch.int64:
            raise ValueError(f"permutation must be [{self.n}] int64, got {list(perm.shape)} {perm.dtype}")
        if self.device.type == "cuda":
            # From pinned memory the copy is asynchronous; the pinned block is not reused before
            # the copy has run (the host allocator records it on the stream).
            self.perm.copy_(perm.pin_memory(), non_blocking=True)
        else:
            self.perm.copy_(perm)
        self.counter.zero_()
        self.steps_taken = 0

    def rows(self) -> Tensor:
        """[batch] int64 row indices of the current step; advances the step counter. Device
        ops only (captured into the step's graph)."""
        idx = self.perm.index_select(0, self.counter * self.batch + self._offsets)
        self.counter.add_(1)
        return idx

    def reset_counter(self) -> None:
        self.counter.zero_()
        self.steps_taken = 0


def split_losses(rec_sum: float, sup_sum: float, labelled: int, rows: int, lam: float) -> tuple[float, float, float]:
    """(loss, rec, sup) of a split from its sums, as the eager ``evaluate_split`` forms them: rec
    is the mean over all rows, sup over labelled rows (NaN when there are none; all NaN for no
    rows)."""
    if rows == 0:
        return (float("nan"),) * 3
    rec = rec_sum / rows
    sup = sup_sum / labelled if labelled else float("nan")
    loss = lam * rec + (1 - lam) * sup if labelled else float("nan")
    return loss, rec, sup


class _Captured:
    """A function captured into a CUDA graph (replay = launch the graph), or, on the CPU, the
    function itself (replay = call it)."""

    def __init__(self, fn: Callable[[], None], graph: torch.cuda.CUDAGraph | None):
        self.fn, self.graph = fn, graph

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class GraphTraining:
    """The graph path of one :class:`~sdml_ext.engine.training.ModalityTrainer` (which creates it and
    routes begin_epoch / step / end_epoch's validation through it).

    Holds the static buffers (permutation, step counter, the epoch's loss sums, the validation
    sums) and the captured step and validation graphs, captured at the first epoch begun after
    construction or after a restore.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.device = trainer.device
        self.cuda = self.device.type == "cuda"
        self.batches = StaticBatches(trainer.train_x.shape[0], trainer.task.options.batch_size, self.device)
        self.sums = torch.zeros(3, dtype=torch.float32, device=self.device)  # loss, rec, sup over the epoch
        # rec sum, sup sum (float64, as eager accumulates them) and labelled rows of the validation split
        self.val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._step: _Captured | None = None
        self._val: _Captured | None = None
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.captures = 0  # how many times the graphs were captured (tests, the GPU check)

    # -- what is captured ----------------------------------------------------------------------

    def _step_body(self) -> None:
        """One training step on the rows the device-side counter points at: the eager step's ops
        in its order (grads set to None first: a captured backward then writes, not adds)."""
        t = self.trainer
        t.optimizer.zero_grad(set_to_none=True)
        idx = self.batches.rows()
        x = t.train_x.index_select(0, idx)
        h, x_hat = t.model(x)
        out = t.loss(x_hat, x, h, t.train_y.index_select(0, idx))
        out.loss.backward()
        t.optimizer.step()
        self.sums += torch.stack([out.loss.detach(), out.rec.detach(), out.sup.detach()]).float()

    @torch.no_grad()
    def _val_body(self) -> None:
        """The validation split's sums, chunk by chunk, as the eager evaluate_split forms them."""
        t = self.trainer
        rec = torch.zeros((), dtype=torch.float64, device=self.device)
        sup = torch.zeros((), dtype=torch.float64, device=self.device)
        labelled = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, t.val_x.shape[0], VAL_CHUNK):
            xs = t.val_x[start : start + VAL_CHUNK]
            h, x_hat = t.model(xs)
            out = t.loss(x_hat, xs, h, t.val_y[start : start + VAL_CHUNK])
            rec += out.row_rec.sum()
            sup += out.row_sup.sum()
            labelled += out.n_labelled
        self.val_sums.copy_(torch.stack([rec, sup, labelled.double()]))

    # -- capture ---------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[list[Tensor], dict[int, dict[str, Tensor]]]:
        t = self.trainer
        params = [p.detach().clone() for p in t.model.parameters()]
        state = {
            i: {k: v.detach().clone() for k, v in t.optimizer.state[p].items() if isinstance(v, Tensor)}
            for i, p in enumerate(t.model.parameters())
            if p in t.optimizer.state
        }
        return params, state

    @torch.no_grad()
    def _write_back(self, snapshot) -> None:
        """Weights and Adam state as they were before the warm-up, written in place (the graphs
        keep their addresses). State the warm-up created is zeroed: what Adam starts from."""
        params, state = snapshot
        t = self.trainer
        for i, (p, saved) in enumerate(zip(t.model.parameters(), params)):
            p.copy_(saved)
            for key, value in t.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    value.copy_(state[i][key]) if i in state else value.zero_()
        self.sums.zero_()
        self.val_sums.zero_()
        self.batches.reset_counter()

    def _warm_up(self) -> None:
        for _ in range(WARMUP_STEPS):  # on the first batch of whatever permutation is loaded
            self.batches.reset_counter()
            self._step_body()
        if self.trainer.val_x.shape[0]:
            self._val_body()

    def capture(self) -> None:
        """Warm up on a snapshot, write it back, then capture the step and validation graphs
        (on the CPU: warm-up and write-back only; the bodies are then called directly)."""
        t = self.trainer
        has_val = t.val_x.shape[0] > 0
        snapshot = self._snapshot()
        if not self.cuda:
            self._warm_up()
            self._write_back(snapshot)
            self._step = _Captured(self._step_body, None)
            self._val = _Captured(self._val_body, None) if has_val else None
            self.captures += 1
            return
        with torch.cuda.device(self.device):
            side, current = self._stream, torch.cuda.current_stream(self.device)
            side.wait_stream(current)
            # Warm-up on the stream the capture will use (cuBLAS keeps a workspace per stream).
            self._set_capturable(False)  # uncaptured steps with capturable=True draw a warning
            with torch.cuda.stream(side):
                self._warm_up()
                self._write_back(snapshot)
            current.wait_stream(side)
            self._set_capturable(True)  # fused Adam: the same arithmetic; lets step() run in a capture
            t.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the grads
            with _CAPTURE_LOCK:
                step = torch.cuda.CUDAGraph()
                with torch.cuda.graph(step, stream=side, capture_error_mode="thread_local"):
                    self._step_body()
                val = None
                if has_val:  # same pool: the two never run at once and keep no outputs in it
                    val = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(val, pool=step.pool(), stream=side, capture_error_mode="thread_local"):
                        self._val_body()
            current.wait_stream(side)
        self._step = _Captured(self._step_body, step)
        self._val = _Captured(self._val_body, val) if val is not None else None
        self.captures += 1

    def _set_capturable(self, value: bool) -> None:
        for group in self.trainer.optimizer.param_groups:
            group["capturable"] = value

    def invalidate(self) -> None:
        """Drop the graphs (after the trainer's state was replaced by a restore)."""
        self._step = self._val = None

    # -- the trainer's epoch ---------------------------------------------------------------------

    def _on_device(self):
        return torch.cuda.device(self.device) if self.cuda else _NULL

    def begin_epoch(self, perm: Tensor) -> None:
        """Capture if needed, then load the epoch's permutation and zero its sums."""
        with self._on_device():
            if self._step is None:
                self.capture()
            self.batches.load(perm)
            self.sums.zero_()

    def step(self, j: int) -> None:
        """Step j of the epoch (steps must come in order: the device's counter picks the rows)."""
        if j != self.batches.steps_taken:
            raise RuntimeError(f"graph training: step {j} requested, but the next step is {self.batches.steps_taken}")
        if self._step is None:
            raise RuntimeError("graph training: step before begin_epoch")
        with self._on_device():
            self._step.replay()
        self.batches.steps_taken += 1

    def validate(self) -> tuple[float, float, float]:
        """(loss, rec, sup) of the validation split on the current weights: one replay and one
        read-back of three numbers."""
        t = self.trainer
        rows = t.val_x.shape[0]
        if rows == 0 or self._val is None:
            return split_losses(0.0, 0.0, 0, rows, t.task.options.lam)
        with self._on_device():
            self._val.replay()
            rec_sum, sup_sum, labelled = self.val_sums.tolist()
        return split_losses(rec_sum, sup_sum, int(labelled), rows, t.task.options.lam)


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _NullContext()
