"""The graph path of training (sdml_ext.engine.cuda_graph_step): its host-side logic on the CPU, where the
step and validation functions it captures on a GPU run as plain calls (warm-up and write-back
included), and the captured path itself on CUDA.

On the CPU the graph path must give the eager autograd path's models (``explicit=False``: the
CPU's default step is the autograd-free one of sdml_ext.engine.explicit_step) bit for bit: the same permutations,
the same batches, the same ops in the same order, and warm-up steps that leave no trace. On CUDA
the captured graphs are held to the eager CUDA path within float tolerance (bitwise is reported
by the GPU check, not required), and to themselves bit for bit across a checkpoint."""

import contextlib

import numpy as np
import pytest
import torch

from helpers import requires_cuda
from sdml_ext.engine.checkpoint import Checkpoints
from sdml_ext.engine.cuda_graph_step import ENV, StaticBatches, graphs_enabled, split_losses
from sdml_ext.data import make_synthetic
from sdml_ext.model import make_projection
from sdml_ext.engine.strategies import train_tasks
from sdml_ext.engine.training import ModalityTrainer, TrainOptions, make_tasks


def make_task(n_train=230, n_val=37, dim=21, epochs=4, multilabel=False, seed=3):
    ds = make_synthetic(1, dims=[dim], n_train=n_train, n_val=n_val, n_test=10, n_classes=4, seed=seed)
    opts = TrainOptions(hidden=(24, 24), code_dim=8, batch_size=20, epochs=epochs, seed=seed)
    task = make_tasks(ds, make_projection(opts.code_dim, ds.num_classes, opts.seed), opts)[0]
    if multilabel:  # multi-hot rows, some unlabelled (all-zero)
        rng = np.random.default_rng(seed)
        task.train_y = (rng.random((n_train, 4)) < 0.4).astype(np.float32)
        task.val_y = (rng.random((n_val, 4)) < 0.4).astype(np.float32)
    return task


def train(trainer, epochs=None, checkpoints=None):
    epochs = epochs or trainer.task.options.epochs
    while trainer.epoch < epochs:
        trainer.begin_epoch()
        for j in range(trainer.steps_per_epoch):
            trainer.step(j)
        trainer.end_epoch()
        if checkpoints is not None:
            checkpoints.after_epoch(trainer)
    return trainer


def _distance(pairs) -> tuple[float, float]:
    """(|a - b|, |a|) over all tensor pairs, in float64."""
    diff = norm = 0.0
    for x, y in pairs:
        x, y = x.detach().cpu().double(), y.detach().cpu().double()
        diff += float(((x - y) ** 2).sum())
        norm += float((x**2).sum())
    return diff**0.5, norm**0.5


def assert_same_training(a: ModalityTrainer, b: ModalityTrainer, exact=True):
    """Bit for bit (exact), or the same training to float rounding: the weights' distance under
    1% of the distance training moved them (Adam turns a rounding difference on a weight whose
    gradient is ~0 into an update of up to the learning rate, so an elementwise tolerance would
    fail on a handful of weights), Adam's moments likewise, the same step counts, losses to 2e-3."""
    weights = list(zip(a.model.state_dict().values(), b.model.state_dict().values()))
    adam = {key: [(a.optimizer.state[pa][key], b.optimizer.state[pb][key])
                  for pa, pb in zip(a.model.parameters(), b.model.parameters())] for key in ("exp_avg", "exp_avg_sq", "step")}
    ha = [(s.train_loss, s.train_rec, s.train_sup, s.val_loss, s.val_rec, s.val_sup, s.best) for s in a.history]
    hb = [(s.train_loss, s.train_rec, s.train_sup, s.val_loss, s.val_rec, s.val_sup, s.best) for s in b.history]
    assert a.best_epoch == b.best_epoch
    if exact:
        for name, (x, y) in zip(a.model.state_dict(), weights):
            assert torch.equal(x.cpu(), y.cpu()), name
        for key, pairs in adam.items():
            assert all(torch.equal(x.cpu(), y.cpu()) for x, y in pairs), key
        # NaN (no labelled validation rows) equals NaN here
        np.testing.assert_array_equal(np.array(ha, dtype=float), np.array(hb, dtype=float))
        return
    init = ModalityTrainer(a.task, "cpu", graphs=False).model.state_dict().values()
    diff, _ = _distance(weights)
    moved, _ = _distance((x, i) for (x, _), i in zip(weights, init))
    assert moved > 0 and diff <= 1e-2 * moved, f"weights {diff:.2e} apart, training moved them {moved:.2e}"
    for key in ("exp_avg", "exp_avg_sq"):
        diff, norm = _distance(adam[key])
        assert diff <= 1e-2 * norm, f"{key}: {diff:.2e} apart, norm {norm:.2e}"
    assert all(torch.equal(x.cpu(), y.cpu()) for x, y in adam["step"])
    np.testing.assert_allclose(np.array(ha, dtype=float), np.array(hb, dtype=float), rtol=2e-3)


# ---- the host-side logic, on the CPU ----------------------------------------------------------------


@pytest.mark.parametrize("multilabel", [False, True])
def test_graph_path_gives_the_eager_models_bit_for_bit(multilabel):
    task = make_task(multilabel=multilabel)
    eager = train(ModalityTrainer(task, "cpu", graphs=False, explicit=False))
    graph = train(ModalityTrainer(task, "cpu", graphs=True))
    assert graph._graph is not None and graph._graph.captures == 1 and eager._graph is None
    assert_same_training(eager, graph)
    r_eager, r_graph = eager.result(), graph.result()
    assert all(np.array_equal(r_eager.state[k], r_graph.state[k]) for k in r_eager.state)


def test_without_a_validation_split_the_last_epoch_is_kept():
    task = make_task(n_val=0, epochs=2)
    eager = train(ModalityTrainer(task, "cpu", graphs=False, explicit=False))
    graph = train(ModalityTrainer(task, "cpu", graphs=True))
    assert graph._graph._val is None and graph.best_epoch == 2
    assert_same_training(eager, graph)


def test_warm_up_leaves_no_trace_in_weights_or_adam_state():
    task = make_task()
    trainer = ModalityTrainer(task, "cpu", graphs=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer._graph.capture()  # two warm-up steps and a validation pass, then the write-back
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    for p in trainer.model.parameters():  # Adam's state as a first step would create it
        assert all(not bool(v.any()) for v in trainer.optimizer.state[p].values())
    assert not bool(trainer._graph.sums.any()) and int(trainer._graph.batches.counter) == 0
    # Later, with Adam state from real steps: the warm-up of a recapture puts it back too.
    train(trainer, epochs=1)
    saved = [{k: v.clone() for k, v in trainer.optimizer.state[p].items()} for p in trainer.model.parameters()]
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    trainer._graph.capture()
    for p, w, s in zip(trainer.model.parameters(), weights, saved):
        assert torch.equal(p, w) and all(torch.equal(trainer.optimizer.state[p][k], v) for k, v in s.items())


def test_static_batches_take_the_permutations_rows_in_order():
    batches = StaticBatches(n=23, batch=5, device=torch.device("cpu"))
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    batches.load(perm)
    for j in range(4):  # 23 // 5 steps; the last 3 rows are dropped, as the eager path does
        assert torch.equal(batches.rows(), perm[j * 5 : (j + 1) * 5])
    assert int(batches.counter) == 4
    batches.load(perm.flip(0))  # a new epoch starts from its first batch
    assert int(batches.counter) == 0 and torch.equal(batches.rows(), perm.flip(0)[:5])
    with pytest.raises(ValueError, match=r"permutation must be \[23\] int64"):
        batches.load(perm[:20])
    with pytest.raises(ValueError, match="permutation must be"):
        batches.load(perm.int())


def test_steps_must_come_in_order():
    trainer = ModalityTrainer(make_task(), "cpu", graphs=True)
    with pytest.raises(RuntimeError, match="step before begin_epoch"):
        trainer.step(0)
    trainer.begin_epoch()
    trainer.step(0)
    with pytest.raises(RuntimeError, match="step 2 requested, but the next step is 1"):
        trainer.step(2)


def test_interleaved_trainers_step_independently():
    """The joint strategy's order: step j of every modality, then j + 1."""
    tasks = [make_task(seed=3), make_task(n_train=150, dim=9, seed=4)]
    alone = [train(ModalityTrainer(t, "cpu", graphs=False, explicit=False)) for t in tasks]
    together = [ModalityTrainer(t, "cpu", graphs=True) for t in tasks]
    for _ in range(tasks[0].options.epochs):
        for t in together:
            t.begin_epoch()
        for j in range(max(t.steps_per_epoch for t in together)):
            for t in together:
                if j < t.steps_per_epoch:
                    t.step(j)
        for t in together:
            t.end_epoch()
    for a, b in zip(alone, together):
        assert_same_training(a, b)


def test_checkpoint_round_trip_continues_bit_for_bit(tmp_path):
    task = make_task(epochs=5)
    straight = train(ModalityTrainer(task, "cpu", graphs=True))
    checkpoints = Checkpoints(str(tmp_path), every_s=0)
    train(ModalityTrainer(task, "cpu", graphs=True), epochs=2, checkpoints=checkpoints)
    resumed = ModalityTrainer(task, "cpu", graphs=True)
    train(resumed, epochs=1)  # graphs captured, then the state is replaced under them
    assert resumed._graph.captures == 1
    assert Checkpoints(str(tmp_path), every_s=0).restore(resumed) and resumed.epoch == 2
    train(resumed)
    assert resumed._graph.captures == 2  # captured again over the restored optimizer state
    assert_same_training(straight, resumed)
    # A checkpoint of the eager path continues on the graph path to the same models, and back.
    eager_dir = tmp_path / "eager"
    train(ModalityTrainer(task, "cpu", graphs=False, explicit=False), epochs=3, checkpoints=Checkpoints(str(eager_dir), every_s=0))
    crossed = ModalityTrainer(task, "cpu", graphs=True)
    assert Checkpoints(str(eager_dir), every_s=0).restore(crossed)
    assert_same_training(straight, train(crossed))


def test_split_losses_form_the_eager_means():
    assert split_losses(3.0, 2.0, 4, 6, 0.5) == (0.5 * 0.5 + 0.5 * 0.5, 0.5, 0.5)
    loss, rec, sup = split_losses(3.0, 0.0, 0, 6, 0.5)
    assert rec == 0.5 and np.isnan(sup) and np.isnan(loss)
    assert all(np.isnan(v) for v in split_losses(0.0, 0.0, 0, 0, 0.5))
    trainer = train(ModalityTrainer(make_task(), "cpu", graphs=True), epochs=1)
    assert trainer._graph.validate() == trainer.evaluate_split(trainer.val_x, trainer.val_y)


def test_selection_of_the_graph_path(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert graphs_enabled(torch.device("cuda", 0)) and not graphs_enabled(torch.device("cpu"))
    assert graphs_enabled(torch.device("cpu"), True) and not graphs_enabled(torch.device("cuda", 0), False)
    monkeypatch.setenv(ENV, "0")
    assert not graphs_enabled(torch.device("cuda", 0))
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(ValueError, match=f"{ENV} must be 1"):
        graphs_enabled(torch.device("cuda", 0))
    assert ModalityTrainer(make_task(), "cpu")._graph is None  # never chosen on the CPU by itself


class FakeGraphs:
    """torch.cuda's graph API as the CUDA branch of GraphTraining.capture uses it, recording the
    order of events. A real capture records its body without running it: the fake runs it and
    then puts back everything it changed (weights, Adam state, counter, sums), and a replay runs
    the recorded body, so the branch's bookkeeping is checked end to end on the CPU."""

    def __init__(self, gt):
        self.gt, self.events, self.last_body = gt, [], None
        fake = self

        class Graph:
            def __init__(self):
                self.body = None

            def pool(self):
                return ("pool", id(self))

            def replay(self):
                self.body()

        class Capture:
            def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
                assert stream is gt._stream and capture_error_mode == "thread_local"
                self.graph, self.pool = graph, pool

            def __enter__(self):
                groups = gt.trainer.optimizer.param_groups
                grads = "none" if all(p.grad is None for p in gt.trainer.model.parameters()) else "set"
                fake.events.append(f"capture capturable={all(g['capturable'] for g in groups)} grads={grads} "
                                   f"pool={'shared' if self.pool else 'own'}")
                self.snapshot = gt._snapshot()

            def __exit__(self, *exc):
                gt._write_back(self.snapshot)  # a real capture changes nothing
                self.graph.body = fake.bodies[fake.last_body]
                return False

        self.Graph, self.Capture = Graph, Capture

    def install(self, monkeypatch):
        gt, fake = self.gt, self

        def wrap(name, body):
            def run():
                fake.last_body = name
                capturable = all(g["capturable"] for g in gt.trainer.optimizer.param_groups)
                fake.events.append(f"{name} capturable={capturable}")
                body()
            return run

        self.bodies = {"step": wrap("step", gt._step_body), "val": wrap("val", gt._val_body)}
        monkeypatch.setattr(gt, "_step_body", self.bodies["step"])
        monkeypatch.setattr(gt, "_val_body", self.bodies["val"])
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.Graph)
        monkeypatch.setattr(torch.cuda, "graph", self.Capture)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: gt._current)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: _record(fake.events, f"on {s.name}"))
        gt._stream, gt._current = _Stream("side", self.events), _Stream("current", self.events)
        gt.cuda = True
        # The CPU cannot pin memory: the permutation is uploaded as on the CPU.
        monkeypatch.setattr(gt.batches, "device", torch.device("cpu"))


class _Stream:
    def __init__(self, name, events):
        self.name, self.events = name, events

    def wait_stream(self, other):
        self.events.append(f"{self.name} waits for {other.name}")


@contextlib.contextmanager
def _record(events, what):
    events.append(what)
    yield
    events.append(f"end {what}")


def test_the_cuda_capture_sequence(monkeypatch):
    """The CUDA branch of the capture: warm-up on the capture's side stream with capturable off,
    the snapshot written back, grads cleared, the step captured with capturable on, the
    validation pass captured into the step's pool; replays of what was captured then train the
    eager path's model bit for bit. The arguments used are torch.cuda.graph's."""
    import inspect

    assert {"pool", "stream", "capture_error_mode"} <= inspect.signature(torch.cuda.graph).parameters.keys()
    task = make_task(epochs=3)
    reference = train(ModalityTrainer(task, "cpu", graphs=False, explicit=False))
    trainer = ModalityTrainer(task, "cpu", graphs=True)
    fake = FakeGraphs(trainer._graph)
    fake.install(monkeypatch)
    train(trainer)
    events = fake.events
    first = events.index("side waits for current")
    assert events[first:first + 5] == ["side waits for current", "on side", "step capturable=False",
                                       "step capturable=False", "val capturable=False"]
    assert events[first + 5:first + 8] == ["end on side", "current waits for side",
                                           "capture capturable=True grads=none pool=own"]
    assert "capture capturable=True grads=set pool=shared" in events  # validation, after the step
    assert events.count("side waits for current") == 1 and trainer._graph.captures == 1
    steps = trainer.steps_per_epoch * task.options.epochs
    assert events.count("step capturable=True") == 1 + steps  # the capture, then one replay per step
    assert_same_training(reference, trainer)


# ---- the captured path, on CUDA ---------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("multilabel", [False, True])
def test_cuda_graphs_give_the_eager_cuda_models(multilabel):
    task = make_task(multilabel=multilabel, n_train=430, dim=300)
    eager = train(ModalityTrainer(task, "cuda:0", graphs=False))
    graph = train(ModalityTrainer(task, "cuda:0"))  # the default on CUDA
    assert graph._graph is not None and graph._graph._step.graph is not None
    assert_same_training(eager, graph, exact=False)
    cpu = train(ModalityTrainer(task, "cpu"))
    assert_same_training(cpu, graph, exact=False)


@requires_cuda
def test_cuda_graph_checkpoint_round_trip_is_bitwise(tmp_path):
    task = make_task(epochs=5, n_train=430, dim=300)
    straight = train(ModalityTrainer(task, "cuda:0"))
    train(ModalityTrainer(task, "cuda:0"), epochs=2, checkpoints=Checkpoints(str(tmp_path), every_s=0))
    resumed = ModalityTrainer(task, "cuda:0")
    assert Checkpoints(str(tmp_path), every_s=0).restore(resumed)
    assert_same_training(straight, train(resumed))


@requires_cuda
@pytest.mark.parametrize("strategy", ["serial", "joint", "parallel"])
def test_cuda_graph_strategies_match_eager(strategy, monkeypatch):
    """Every strategy on graphs against the eager CUDA path (parallel: one stream and thread per
    modality, each capturing its own graphs)."""
    ds = make_synthetic(3, dims=[300, 40, 29], n_train=[430, 250, 200], n_val=40, n_test=20, n_classes=5, seed=4)
    opts = TrainOptions(hidden=(64, 64), code_dim=16, batch_size=50, epochs=3)
    tasks = make_tasks(ds, make_projection(opts.code_dim, ds.num_classes, opts.seed), opts)
    graphs = train_tasks(tasks, strategy, devices=["cuda:0"])
    monkeypatch.setenv(ENV, "0")
    eager = train_tasks(tasks, strategy, devices=["cuda:0"])
    for a, b in zip(eager.modalities, graphs.modalities):
        assert a.best_epoch == b.best_epoch
        pairs = [(torch.from_numpy(a.state[k]), torch.from_numpy(b.state[k])) for k in a.state]
        diff, norm = _distance(pairs)
        assert diff <= 1e-4 * norm, f"{strategy} {a.name}: graphs' weights {diff:.2e} from eager's (norm {norm:.2e})"
