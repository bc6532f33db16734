"""Training one modality's DSAE against the fixed projection P.

A :class:`ModalityTrainer` owns everything one modality needs: its network, its Adam optimizer,
its data on the device and its own random generators, seeded from (run seed, modality index).
Nothing is shared between modalities but the constant P, which is why the three strategies of
:mod:`sdml_ext.engine.strategies` (joint, serial, parallel) give the same models: they only differ in
how the trainers' steps are interleaved in time and where they run (bitwise with the same thread
count; a different count changes the GEMMs' summation order, so weights agree to float rounding).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from ..data import Modality
from ..loss import DSAELoss, label_targets
from ..model import DEFAULT_CODE_DIM, DEFAULT_HIDDEN, DSAE
from ..preprocess import PREPROCESS_MODES, Preprocessor
from .cuda_graph_step import GraphTraining, graphs_enabled
from .explicit_step import ExplicitStep
from .records import EpochStats, ModalityResult

DEFAULT_LRS = (1e-4, 2e-4)
"""Authors' learning rates: the first for modality 0, the last for every later modality."""

DEFAULT_EPOCHS = 40
"""Default epochs per modality: enough for the embedded digits' demo to finish in a few minutes
on 2 CPU cores. The paper trains 200 (PAPER_EPOCHS); pass that to reproduce it."""

PAPER_EPOCHS = 200

_INIT_LOCK = threading.Lock()
_EVAL_CHUNK = 2048  # rows per forward pass when scoring a split, to bound activation memory


SEED_LIMIT = 2**32
"""Seeds are in [0, 2**32): numpy's seed range (np.random.seed, RandomState), which torch takes too."""


@dataclass(frozen=True)
class TrainOptions:
    """Hyper-parameters shared by all modalities of a run: the authors' recipe except for the
    number of epochs (see DEFAULT_EPOCHS). :class:`sdml_ext.engine.config.RunConfig`, the settings of a
    whole run, extends this class, so every setting has one name and one default.

    lr: learning rates by modality index; modalities past the end use the last value (a single
    number means the same rate for all). Sequences are stored as tuples.
    """

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 100
    lam: float = 0.5
    lr: tuple[float, ...] = DEFAULT_LRS
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    code_dim: int = DEFAULT_CODE_DIM
    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    normalize_code: bool = True
    normalize_output: bool = True
    preprocess: str = "standardize"

    def __post_init__(self):
        for name in ("lr", "betas", "hidden"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, (int, float)) else value
            try:
                object.__setattr__(self, name, tuple(value))  # frozen: the one sanctioned write
            except TypeError:
                raise ValueError(f"{name} must be a sequence of numbers, got {value!r}") from None
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if isinstance(self.seed, bool) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, {SEED_LIMIT - 1}] (numpy's seed range), got {self.seed}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if not self.lr or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lr):
            raise ValueError(f"learning rates must be positive and finite, got {list(self.lr)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {self.code_dim}")
        if not self.hidden or any(w < 1 for w in self.hidden):
            raise ValueError(f"hidden must be one or more layer widths >= 1, got {list(self.hidden)}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {self.preprocess!r}")

    def lr_for(self, index: int) -> float:
        return float(self.lr[min(index, len(self.lr) - 1)])

    def seed_for(self, index: int) -> int:
        """The seed of modality `index`: a pure function of (seed, index), independent of strategy."""
        return int(np.random.SeedSequence([int(self.seed), int(index)]).generate_state(1)[0])

    def model_options(self, input_dim: int) -> dict:
        return {
            "input_dim": int(input_dim),
            "code_dim": self.code_dim,
            "hidden": list(self.hidden),
            "normalize_code": self.normalize_code,
            "normalize_output": self.normalize_output,
        }


@dataclass
class ModalityTask:
    """One modality to train: what a worker process receives (plain, picklable data).

    train_x/val_x: (n, D) float32 arrays; train_y/val_y: (n,) int64 class ids (-1 = unlabelled)
    or (n, c) 0/1 rows. P: [d, c] float32 tensor. index: the modality's position in the bundle
    (it picks the learning rate and the seed).
    """

    name: str
    index: int
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    P: Tensor
    options: TrainOptions

    @property
    def input_dim(self) -> int:
        return int(self.train_x.shape[1])

    def steps_per_epoch(self) -> int:
        return self.train_x.shape[0] // self.options.batch_size

    def cost(self) -> float:
        return training_cost(self.train_x.shape[0], self.input_dim, self.options)


def training_cost(train_rows: int, input_dim: int, options: TrainOptions) -> float:
    """Relative cost of training one modality, for scheduling: multiply-adds of forward +
    backward (~3 per weight per sample) plus the Adam update (~5 per weight per step), per
    epoch. Needs only the modality's shape, so a plan can be made before its data is read."""
    dims = [input_dim, *options.hidden, options.code_dim]
    weights = 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return (train_rows // options.batch_size) * weights * (3 * options.batch_size + 5) * options.epochs


class ModalityTrainer:
    """Trains one modality; drive it with :meth:`run`, or step by step (joint strategy) with
    :meth:`begin_epoch`, :meth:`step` for j in range(steps_per_epoch), :meth:`end_epoch`.

    Args:
        task: the modality and the run's options.
        device: where to train ("cpu", "cuda:0", ...).
        graphs: replay each step from a CUDA graph (:mod:`sdml_ext.engine.cuda_graph_step`): None =
            on CUDA devices unless SDML_CUDA_GRAPHS=0; False = eager steps (the reference);
            True on the CPU runs the graph path's steps uncaptured (for tests).
        explicit: take CPU steps without autograd (:mod:`sdml_ext.engine.explicit_step`): None =
            on the CPU without graphs; False = autograd steps (the reference the explicit step
            is tested against, and what every other device runs).
    """

    def __init__(self, task: ModalityTask, device: str | torch.device = "cpu", graphs: bool | None = None,
                 explicit: bool | None = None):
        self.task = task
        opts = task.options
        self.device = torch.device(device)
        self.steps_per_epoch = task.steps_per_epoch()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"modality {task.name!r}: {task.train_x.shape[0]} training samples are fewer than "
                f"the batch size {opts.batch_size} (the last incomplete batch is dropped); lower "
                f"the batch size"
            )
        if task.P.dim() != 2 or task.P.shape[0] != opts.code_dim:
            raise ValueError(
                f"projection P has shape {tuple(task.P.shape)} but the code width is {opts.code_dim}"
            )
        self.seed = opts.seed_for(task.index)
        self.lr = opts.lr_for(task.index)
        # Initial weights and shuffles come from this modality's own seed, drawn on the CPU, so
        # they do not depend on the strategy, the device or what other modalities did first.
        # nn.Linear draws from the global generator: the lock keeps trainers built in parallel
        # threads (CUDA streams) from reseeding it under each other.
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model = DSAE(**opts.model_options(task.input_dim))
        self.model.to(self.device)
        self.shuffle = torch.Generator().manual_seed(self.seed)
        self.preprocessor = Preprocessor.fit(opts.preprocess, task.train_x)
        c = task.P.shape[1]
        self.train_x, self.train_y = self._to_device(task.train_x, task.train_y, c)
        self.val_x, self.val_y = self._to_device(task.val_x, task.val_y, c)
        self.val_labelled = int((self.val_y.sum(1) > 0).sum()) if self.val_x.shape[0] else 0
        # check_finite costs a stream sync per call on CUDA; there the epoch's accumulated loss
        # is checked instead (in end_epoch), where a sync happens anyway.
        self.loss = DSAELoss(task.P, opts.lam, check_finite=self.device.type == "cpu").to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.lr, betas=tuple(opts.betas), fused=self.device.type in ("cpu", "cuda")
        )
        self.epoch = 0
        self.history: list[EpochStats] = []
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state: dict[str, Tensor] | None = None
        self.busy_s = 0.0  # wall seconds in this trainer's steps and epoch ends
        self.cpu_s = 0.0  # CPU seconds of this process (all its threads) meanwhile
        self._perm: Tensor | None = None
        self._sums: Tensor | None = None
        # Every step's batch is gathered into these (every batch has batch_size rows: the last
        # incomplete one is dropped), so a step allocates no input tensors.
        self._batch_x = self.train_x.new_empty((opts.batch_size, self.train_x.shape[1]))
        self._batch_y = self.train_y.new_empty((opts.batch_size, self.train_y.shape[1]))
        self._graph = GraphTraining(self) if graphs_enabled(self.device, graphs) else None
        if explicit is None:
            explicit = self.device.type == "cpu" and self._graph is None
        if explicit and (self.device.type != "cpu" or self._graph is not None):
            raise ValueError("explicit steps run on the CPU without graphs only")
        self._explicit = ExplicitStep(self.model, self.optimizer, self.loss, opts.batch_size) if explicit else None

    def _to_device(self, x: np.ndarray, y: np.ndarray, c: int) -> tuple[Tensor, Tensor]:
        """Preprocessed features [n, D] and label rows [n, c], float32 on the device."""
        features = self.preprocessor(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        rows = label_targets(torch.from_numpy(np.asarray(y)), c, torch.float32)
        return features.to(self.device).contiguous(), rows.to(self.device).contiguous()

    @contextlib.contextmanager
    def _clock(self):
        """Adds the enclosed wall and process CPU time to busy_s and cpu_s."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.busy_s += time.perf_counter() - wall
            self.cpu_s += time.process_time() - cpu

    def begin_epoch(self) -> None:
        with self._clock():
            self.model.train()
            if self._graph is not None:  # the same permutation, uploaded into the graphs' buffer
                self._graph.begin_epoch(torch.randperm(self.train_x.shape[0], generator=self.shuffle))
                self._perm, self._sums = self._graph.batches.perm, self._graph.sums
                return
            self._perm = torch.randperm(self.train_x.shape[0], generator=self.shuffle).to(self.device)
            self._sums = torch.zeros(3, dtype=torch.float32, device=self.device)

    def step(self, j: int) -> None:
        """One Adam step on batch j of the current epoch's permutation."""
        with self._clock():
            if self._graph is not None:
                self._graph.step(j)
                return
            b = self.task.options.batch_size
            idx = self._perm[j * b : (j + 1) * b]
            x = torch.index_select(self.train_x, 0, idx, out=self._batch_x)
            if self._explicit is not None:
                y = torch.index_select(self.train_y, 0, idx, out=self._batch_y)
                self._sums += torch.stack(self._explicit(x, y)).float()
                return
            h, x_hat = self.model(x)
            out = self.loss(x_hat, x, h, torch.index_select(self.train_y, 0, idx, out=self._batch_y))
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            self.optimizer.step()
            self._sums += torch.stack([out.loss.detach(), out.rec.detach(), out.sup.detach()]).float()

    def end_epoch(self) -> EpochStats:
        """Scores the validation split and keeps the best state; returns the epoch's losses."""
        with self._clock():
            self.epoch += 1
            train = (self._sums / self.steps_per_epoch).tolist()
            if not all(math.isfinite(v) for v in train):
                raise FloatingPointError(
                    f"modality {self.task.name!r}: the training loss became {train[0]} in epoch "
                    f"{self.epoch}; lower the learning rate ({self.lr}) or check the input features"
                )
            val = self._graph.validate() if self._graph is not None else self.evaluate_split(self.val_x, self.val_y)
            # Without labelled validation rows there is nothing to select on: keep the last epoch.
            selectable = self.val_labelled > 0
            best = (val[2] < self.best_loss) if selectable else True
            if best:
                self.best_loss = val[2] if selectable else math.inf
                self.best_epoch = self.epoch
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            stats = EpochStats(self.task.name, self.epoch, *train, *val, best)
            self.history.append(stats)
        return stats

    @torch.no_grad()
    def evaluate_split(self, x: Tensor, y: Tensor) -> tuple[float, float, float]:
        """(loss, rec, sup) over a whole split, in chunks: rec is the mean over all rows, sup
        the mean over labelled rows (NaN when there are none; everything NaN for no rows)."""
        if x.shape[0] == 0:
            return (math.nan,) * 3
        self.model.eval()
        rec_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        sup_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        labelled = 0
        for start in range(0, x.shape[0], _EVAL_CHUNK):
            xs = x[start : start + _EVAL_CHUNK]
            h, x_hat = self.model(xs)
            out = self.loss(x_hat, xs, h, y[start : start + _EVAL_CHUNK])
            rec_sum += out.row_rec.sum()
            sup_sum += out.row_sup.sum()
            labelled += int(out.n_labelled)
        rec = float(rec_sum) / x.shape[0]
        sup = float(sup_sum) / labelled if labelled else math.nan
        lam = self.task.options.lam
        loss = lam * rec + (1 - lam) * sup if labelled else math.nan
        return loss, rec, sup

    def run(self, on_epoch: Callable[[EpochStats], None] | None = None, checkpoints=None) -> ModalityResult:
        """All epochs; ``on_epoch(stats)`` after each (progress, cancellation by raising).

        checkpoints: a :class:`sdml_ext.engine.checkpoint.Checkpoints`; training continues from this
        modality's checkpoint there, if any (its past epochs are replayed to ``on_epoch``), and
        saves one at the end of epochs as the checkpoints' cadence says and after the last.
        """
        if checkpoints is not None and checkpoints.restore(self) and on_epoch is not None:
            for stats in self.history:
                on_epoch(stats)
        while self.epoch < self.task.options.epochs:
            self.begin_epoch()
            for j in range(self.steps_per_epoch):
                self.step(j)
            stats = self.end_epoch()
            if checkpoints is not None:
                checkpoints.after_epoch(self)
            if on_epoch is not None:
                on_epoch(stats)
        return self.result()

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Everything training continues from, at an epoch boundary: CPU tensors (network
        ``model.*``, Adam moments and step counts ``adam.<param>.*``, the kept weights
        ``best.*``, the shuffle generator's state ``rng.shuffle`` as uint8) and a JSON-ready
        record (epoch, kept epoch and loss, history, time spent). Nothing else is random: the
        initial weights are drawn once from the modality's seed, and the steps draw nothing."""
        tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        params = list(self.model.parameters())
        for i, p in enumerate(params):
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = value.detach().cpu().clone()
        if self.best_state is not None:
            tensors.update({f"best.{k}": v.detach().cpu().clone() for k, v in self.best_state.items()})
        tensors["rng.shuffle"] = self.shuffle.get_state().clone()
        record = {
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best_loss": self.best_loss,
            "history": [asdict(s) for s in self.history],
            "busy_s": self.busy_s,
            "cpu_s": self.cpu_s,
        }
        return tensors, record

    def restore(self, tensors: dict[str, Tensor], record: dict) -> None:
        """Continue from :meth:`state`'s output (the same task): the next epoch and every one
        after it are computed exactly as if training had never stopped."""
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        params = list(self.model.parameters())
        saved = self.optimizer.state_dict()
        saved["state"] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, i, name = key.split(".", 2)
                saved["state"].setdefault(int(i), {})[name] = value
        if saved["state"].keys() - set(range(len(params))):
            raise ValueError("checkpoint: Adam state for parameters this network does not have")
        self.optimizer.load_state_dict(saved)
        # In the network's own order (a checkpoint file stores names sorted): the bundle's file
        # then comes out byte for byte as from a run that never stopped.
        best = {k: tensors[f"best.{k}"].to(self.device) for k in self.model.state_dict() if f"best.{k}" in tensors}
        self.best_state = best or None
        self.shuffle.set_state(tensors["rng.shuffle"].clone())
        self.epoch = int(record["epoch"])
        self.best_epoch = int(record["best_epoch"])
        self.best_loss = float(record["best_loss"])
        self.history = [EpochStats(**s) for s in record["history"]]
        self.busy_s = float(record["busy_s"])
        self.cpu_s = float(record["cpu_s"])
        if self._graph is not None:
            self._graph.invalidate()  # the optimizer's state tensors were replaced: capture again
        if self._explicit is not None:
            self._explicit.invalidate()  # likewise: adopt them into the flat moments again

    def state_bytes(self) -> int:
        """Bytes of the tensors this trainer holds: data, weights, gradients, Adam moments and
        the kept best state (activations, which live only during a step, excluded)."""
        tensors: list[Tensor] = [self.train_x, self.train_y, self.val_x, self.val_y]
        tensors += [p for p in self.model.parameters()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, Tensor)]
        if self.best_state is not None:
            tensors += list(self.best_state.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def result(self) -> ModalityResult:
        """The kept state as CPU numpy arrays (with the fitted preprocessing) and the record."""
        if self.best_state is None:
            raise RuntimeError(f"modality {self.task.name!r}: no epoch has been trained yet")
        state = {k: v.detach().cpu().numpy() for k, v in self.best_state.items()}
        state.update({k: v.numpy() for k, v in self.preprocessor.tensors().items()})
        return ModalityResult(
            name=self.task.name,
            index=self.task.index,
            model_options=self.model.options(),
            preprocess=self.task.options.preprocess,
            lr=self.lr,
            seed=self.seed,
            state=state,
            best_epoch=self.best_epoch,
            selection="lowest validation supervised loss" if self.val_labelled else "last epoch (no labelled validation data)",
            history=list(self.history),
            time_s=self.busy_s,
            cpu_s=self.cpu_s,
            state_bytes=self.state_bytes(),
            device=str(self.device),
        )


def make_tasks(
    modalities: Sequence[Modality],
    P: Tensor,
    options: TrainOptions,
    first_index: int = 0,
) -> list[ModalityTask]:
    """One task per modality (its train and val splits), indexed from ``first_index`` (the
    number of modalities already in a bundle when adding one)."""
    return [
        ModalityTask(m.name, first_index + i, m.train.features, m.train.labels, m.val.features, m.val.labels, P, options)
        for i, m in enumerate(modalities)
    ]
