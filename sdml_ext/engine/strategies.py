"""The paper's three ways to train m modality networks (SDML §4.6), which differ in time and
memory only; every modality is trained by its own :class:`~sdml_ext.engine.training.ModalityTrainer`.

- ``joint`` (SDML-1): one loop; each iteration steps every modality once, on one device.
- ``serial`` (SDML-2): one modality after another, on one device.
- ``parallel`` (SDML-3): modalities at the same time.
    CPU: worker processes (forkserver, else spawn) pull modalities from a queue in descending
    order of cost (longest first, which balances the load); the cores are split evenly between
    the workers, each keeping its share for the whole run (so the same command gives the same
    models: a GEMM's result depends on its thread count).
    CUDA: one thread and stream per modality; with several devices the modalities are spread
    over them, each to the least-loaded device by cost.

A failing modality stops the whole run: the other workers are ended and a
:class:`~sdml_ext.errors.ModalityError` (bad data or settings, divergence) or a
:class:`~sdml_ext.errors.WorkerCrash` (a bug, a dead worker) names the modality and the error.
With ``checkpoints`` every strategy saves each modality's state as it trains and continues
from it (see :mod:`sdml_ext.engine.checkpoint`). Worker processes die with the run, whatever ends it
(see :mod:`sdml_ext.engine.signals`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..devices import ready_device, ready_devices
from ..errors import ModalityError, WorkerCrash, WorkerError  # noqa: F401 (WorkerError: both kinds)
from . import semaphores
from .checkpoint import Checkpoints
from .records import EpochStats, ModalityResult
from .signals import bind_to_parent
from .training import ModalityTask, ModalityTrainer

STRATEGIES = ("joint", "serial", "parallel")

OnEpoch = Callable[[EpochStats], None]


@dataclass
class StrategyResult:
    """What one strategy hands back: the trained modalities, in task order, and how it ran.

    device_peak_bytes: CUDA only, the peak allocated memory per device.
    worker_peak_rss_bytes: the peak resident memory of the worker processes, summed (parallel
        CPU; 0 where the modalities train in this process).
    plan: how the work was laid out (workers, threads, order, device assignment), JSON-ready.
    """

    modalities: list[ModalityResult]
    device_peak_bytes: dict[str, int] = field(default_factory=dict)
    worker_peak_rss_bytes: int = 0
    plan: dict = field(default_factory=dict)


@dataclass
class RunReport:
    """Time and memory of a run (the paper's Tables 6 and 7) and its trained modalities.

    wall_s: the whole run, from the first trainer being built to the last result in hand.
    peak_rss_bytes: the peak resident memory of every process that trained, summed (for
        parallel CPU: the main process plus each worker); an upper bound of the run's peak.
    device_peak_bytes: CUDA only, the peak allocated memory per device.
    plan: how the work was laid out (workers, threads, order, device assignment).
    """

    strategy: str
    devices: list[str]
    wall_s: float
    peak_rss_bytes: int
    modalities: list[ModalityResult]
    device_peak_bytes: dict[str, int] = field(default_factory=dict)
    plan: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready: the run's numbers and each modality's record (without weights)."""
        return {
            "strategy": self.strategy,
            "devices": self.devices,
            "wall_s": self.wall_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "device_peak_bytes": self.device_peak_bytes,
            "plan": self.plan,
            "modalities": [r.summary() for r in self.modalities],
        }

    def table(self) -> str:
        """Per-modality and whole-run time and memory as aligned text."""
        width = max([len(r.name) for r in self.modalities] + [len("modality")])
        lines = [f"{'modality':<{width}}  {'time s':>8}  {'CPU s':>8}  {'state MiB':>9}  {'peak MiB':>8}  best epoch"]

        def cell(value, fmt):
            return f"{value:8{fmt}}" if value is not None else f"{'-':>8}"

        for r in self.modalities:
            peak = r.peak_memory_bytes / 2**20 if r.peak_memory_bytes else None
            lines.append(
                f"{r.name:<{width}}  {cell(r.time_s, '.1f')}  {cell(r.cpu_s, '.1f')}  "
                f"{r.state_bytes / 2**20:9.1f}  {cell(peak, '.0f')}  {r.best_epoch}"
            )
        memory = f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        if self.device_peak_bytes:
            memory += ", " + ", ".join(f"{d} peak {b / 2**20:.0f} MiB" for d, b in self.device_peak_bytes.items())
        lines.append(f"whole run ({self.strategy}): {self.wall_s:.1f} s, {memory}")
        return "\n".join(lines)


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which belongs to the process image;
    ru_maxrss would carry the parent's peak into a spawned worker across fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def train_tasks(
    tasks: Sequence[ModalityTask],
    strategy: str = "parallel",
    devices: Sequence[str] = ("cpu",),
    on_epoch: OnEpoch | None = None,
    cores: int | None = None,
    checkpoints: Checkpoints | None = None,
) -> RunReport:
    """Train every task with `strategy` and return the results in task order.

    Args:
        tasks: the modalities (see :func:`sdml_ext.engine.training.make_tasks`).
        strategy: one of STRATEGIES.
        devices: "cpu", or one or more CUDA devices ("cuda:0", ...). joint and serial use the
            first; parallel spreads modalities over all of them.
        on_epoch: called in this process (this thread) after every epoch of every modality.
        cores: CPU cores for parallel CPU training (default: all usable cores).
        checkpoints: where each modality's training state is saved and continued from (None:
            no checkpoints). Finished modalities are loaded, not retrained.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if not tasks:
        raise ValueError("nothing to train: no modalities")
    devices = [str(torch.device(d)) for d in devices] or ["cpu"]
    kinds = {torch.device(d).type for d in devices}
    if len(kinds) > 1 or kinds - {"cpu", "cuda"} or (kinds == {"cpu"} and len(devices) > 1):
        raise ValueError(f"devices must be 'cpu' or one or more CUDA devices, got {devices}")
    if kinds == {"cuda"}:
        devices = ready_devices(devices)  # checked and initialised before any trainer touches them
    on_epoch = on_epoch or (lambda stats: None)
    start = time.perf_counter()
    if checkpoints is not None:
        checkpoints.remove_stale_temporaries()
    if strategy == "joint":
        done = _joint(tasks, devices[0], on_epoch, checkpoints)
    elif strategy == "serial":
        done = _serial(tasks, devices[0], on_epoch, checkpoints)
    elif devices[0] == "cpu":
        done = _parallel_cpu(tasks, on_epoch, cores or usable_cores(), checkpoints)
    else:
        done = _parallel_cuda(tasks, devices, on_epoch, checkpoints)
    wall = time.perf_counter() - start
    return RunReport(
        strategy=strategy,
        devices=devices if strategy == "parallel" else devices[:1],
        wall_s=wall,
        peak_rss_bytes=_peak_rss_bytes() + done.worker_peak_rss_bytes,
        modalities=done.modalities,
        device_peak_bytes=done.device_peak_bytes,
        plan=done.plan,
    )


def _cuda_peaks(devices: Sequence[str]) -> dict[str, int]:
    return {d: torch.cuda.max_memory_allocated(d) for d in devices if d.startswith("cuda")}


def _reset_cuda_peaks(devices: Sequence[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            ready_device(d, reset_peak=True)


@contextlib.contextmanager
def _blame(task: ModalityTask):
    """Report bad input or divergence of one modality as a ModalityError that names it."""
    try:
        yield
    except (ValueError, FloatingPointError) as exc:
        raise ModalityError(f"modality {task.name!r} failed: {type(exc).__name__}: {exc}") from exc


def _serial(tasks, device, on_epoch, checkpoints) -> StrategyResult:
    results = []
    run_peak = 0
    for task in tasks:
        _reset_cuda_peaks([device])
        with _blame(task):
            result = ModalityTrainer(task, device).run(on_epoch, checkpoints)
        if device.startswith("cuda"):
            result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
            run_peak = max(run_peak, result.peak_memory_bytes)
        results.append(result)
    # The device's counter was reset for every modality: the run's peak is the largest of theirs.
    return StrategyResult(results, device_peak_bytes={device: run_peak} if device.startswith("cuda") else {})


def _joint(tasks, device, on_epoch, checkpoints) -> StrategyResult:
    _reset_cuda_peaks([device])
    trainers = []
    for task in tasks:
        with _blame(task):
            trainer = ModalityTrainer(task, device)
            if checkpoints is not None and checkpoints.restore(trainer):
                for stats in trainer.history:
                    on_epoch(stats)
        trainers.append(trainer)
    epochs = tasks[0].options.epochs
    # Restored trainers may stand at different epochs; each steps until it has all of them.
    while active := [t for t in trainers if t.epoch < epochs]:
        for trainer in active:
            trainer.begin_epoch()
        # Modalities with fewer batches drop out of the later iterations of the epoch.
        for j in range(max(t.steps_per_epoch for t in active)):
            for trainer in active:
                if j < trainer.steps_per_epoch:
                    with _blame(trainer.task):
                        trainer.step(j)
        for trainer in active:
            with _blame(trainer.task):
                stats = trainer.end_epoch()
            if checkpoints is not None:
                checkpoints.after_epoch(trainer)
            on_epoch(stats)
    results = [t.result() for t in trainers]
    if device.startswith("cuda"):
        # Kernels of all modalities are queued together; host-side step times do not
        # attribute GPU time to a modality, so only the run's time is reported.
        for r in results:
            r.time_s = r.cpu_s = None
    return StrategyResult(results, device_peak_bytes=_cuda_peaks([device]))


def _collect(events: queue.Queue, tasks, on_epoch, check_alive: Callable[[], None]) -> list[ModalityResult]:
    """Receive ("epoch", stats) / ("done", result) / ("error", index, (user, message, detail))
    events until every task has a result; raise ModalityError (user) or WorkerCrash on the
    first error."""
    by_index = {t.index: t for t in tasks}
    results: dict[int, ModalityResult] = {}
    while len(results) < len(tasks):
        try:
            event = events.get(timeout=0.5)
        except queue.Empty:
            check_alive()
            continue
        if event[0] == "epoch":
            on_epoch(event[1])
        elif event[0] == "done":
            results[event[1].index] = event[1]
        else:
            _, index, (user, message, detail) = event
            message = f"modality {by_index[index].name!r} failed: {message}"
            raise ModalityError(message) if user else WorkerCrash(message, detail)
    return [results[t.index] for t in tasks]


def _describe(exc: BaseException) -> tuple[bool, str, str]:
    """(user-caused?, one-line message, traceback) of a worker's exception: bad input and
    divergence are the user's to fix; anything else (out of memory included) is a crash."""
    user = isinstance(exc, (ValueError, FloatingPointError))
    detail = "" if user else "".join(traceback.format_exception(exc)).rstrip()
    return user, f"{type(exc).__name__}: {exc}", detail


def _thread_share(cores: int, active) -> int:
    return max(1, cores // max(1, active.value))


def _cpu_worker(rank: int, task_queue, events, active, threads: int, checkpoints: Checkpoints | None,
                main_pid: int) -> None:
    """Worker process: trains modalities from task_queue until the None sentinel, with
    `threads` threads throughout (the same for every modality of the run: a GEMM's sums depend
    on its thread count, so a count that followed the other workers' progress would make two
    runs of the same command differ)."""
    bind_to_parent(main_pid)  # a parent that stops reading ends this process; it never waits on a full pipe
    torch.set_num_threads(threads)
    try:
        while (task := task_queue.get()) is not None:
            try:
                def on_epoch(stats):
                    events.put(("epoch", stats))

                result = ModalityTrainer(task, "cpu").run(on_epoch, checkpoints)
                result.peak_memory_bytes = _peak_rss_bytes()
                result.device = f"cpu (worker {rank})"
                events.put(("done", result))
            except KeyboardInterrupt:
                return
            except BaseException as exc:  # reported to the parent, which stops the run
                events.put(("error", task.index, _describe(exc)))
                return
    finally:
        with active.get_lock():
            active.value -= 1


def _worker_context():
    """How worker processes start. Not fork: forking a process whose OpenMP/MKL thread pools
    have run is unsafe. forkserver (where available) imports torch once in a server that never
    computes and forks workers from it, which saved ~3 s of start-up per run on a loaded
    2-core machine over spawn, where every worker imports torch itself."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["sdml_ext.engine.training"])
        return ctx
    return mp.get_context("spawn")


class _WorkerWatch:
    """Liveness of the worker processes, checked whenever no event came for a while."""

    def __init__(self, workers):
        self.workers = workers
        self.all_exited_seen = False

    def died(self) -> None:
        """A worker that ended with a non-zero status (killed, out of memory) fails the run."""
        for w in self.workers:
            if w.exitcode not in (None, 0):
                raise WorkerCrash(
                    f"training worker {w.name} died with exit code {w.exitcode} (killed, e.g. out of memory?)"
                )

    def quit_early(self) -> None:
        """Every worker exited cleanly but results are missing. A worker's last events are in
        the pipe before it exits: one more empty wait after seeing all of them gone means those
        events were read and some result never came."""
        if all(w.exitcode == 0 for w in self.workers):
            if self.all_exited_seen:
                raise WorkerCrash("the training workers exited before every modality was trained")
            self.all_exited_seen = True

    def __call__(self) -> None:
        self.died()
        self.quit_early()


def _stop_workers(workers, grace_s: float) -> None:
    """Join finished workers (up to grace_s each); terminate, then kill, the others."""
    for w in workers:
        w.join(timeout=grace_s)
    for w in workers:
        if w.is_alive():
            w.terminate()
    for w in workers:
        w.join(timeout=5)
        if w.is_alive():
            w.kill()
            w.join()


def _parallel_cpu(tasks, on_epoch, cores, checkpoints) -> StrategyResult:
    n_workers = max(1, min(len(tasks), cores))
    order = sorted(tasks, key=lambda t: -t.cost())
    ctx = _worker_context()
    semaphores.remove_leaked()  # of earlier runs killed with their resource tracker
    with semaphores.named_for_this_run():
        task_queue, events = ctx.Queue(), ctx.Queue()
        active = ctx.Value("i", n_workers)
    # The main process must never wait at exit for queued tasks or events nobody reads (an
    # interrupted run would hang in the queue's finalizer until a second Ctrl-C).
    task_queue.cancel_join_thread()
    events.cancel_join_thread()
    for task in order:
        task_queue.put(task)
    for _ in range(n_workers):
        task_queue.put(None)
    workers = [
        ctx.Process(target=_cpu_worker, args=(i, task_queue, events, active, max(1, cores // n_workers), checkpoints,
                                              os.getpid()),
                    name=f"sdml-worker-{i}", daemon=True)
        for i in range(n_workers)
    ]
    ok = False
    try:
        for w in workers:
            w.start()
        results = _collect(events, tasks, on_epoch, _WorkerWatch(workers))
        ok = True
    finally:
        _stop_workers(workers, grace_s=5 if ok else 0)  # finished workers exit by themselves
        task_queue.close()
        events.close()
    plan = {
        "workers": n_workers,
        "cores": cores,
        "threads_per_worker_at_start": max(1, cores // n_workers),  # and throughout
        "order": [t.name for t in order],
    }
    # Each result carries its worker's peak when it finished; a worker's last is its peak.
    workers_peak = sum(max(r.peak_memory_bytes for r in results if r.device == device)
                       for device in {r.device for r in results})
    return StrategyResult(results, worker_peak_rss_bytes=workers_peak, plan=plan)


def _assign_devices(tasks, devices) -> dict[int, str]:
    """Longest-processing-time-first: each task to the device with the least cost so far."""
    load = {d: 0.0 for d in devices}
    out = {}
    for task in sorted(tasks, key=lambda t: -t.cost()):
        device = min(devices, key=lambda d: load[d])
        load[device] += task.cost()
        out[task.index] = device
    return out


class _Cancelled(Exception):
    pass


def _parallel_cuda(tasks, devices, on_epoch, checkpoints) -> StrategyResult:
    assignment = _assign_devices(tasks, devices)
    alone = {d: sum(1 for v in assignment.values() if v == d) == 1 for d in devices}
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    _reset_cuda_peaks(devices)

    def work(task):
        device = assignment[task.index]
        try:
            with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
                def relay(stats):
                    if stop.is_set():
                        raise _Cancelled
                    events.put(("epoch", stats))

                result = ModalityTrainer(task, device).run(relay, checkpoints)
                torch.cuda.current_stream().synchronize()
            if alone[device]:  # the device's peak is this modality's only when it is alone there
                result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
            result.cpu_s = None  # process CPU time counts every modality's thread
            events.put(("done", result))
        except _Cancelled:
            pass
        except BaseException as exc:
            events.put(("error", task.index, _describe(exc)))

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in tasks]
    try:
        for t in threads:
            t.start()
        results = _collect(events, tasks, on_epoch, lambda: None)
    finally:
        stop.set()
        for t in threads:
            t.join()
    plan = {"streams": len(tasks), "assignment": {t.name: assignment[t.index] for t in tasks}}
    return StrategyResult(results, device_peak_bytes=_cuda_peaks(devices), plan=plan)
