"""Training across processes and machines with torch.distributed, launched by ``torchrun``.

Every rank runs the same command. The modalities are assigned to ranks by cost, longest first,
each to the rank with the least work so far (ranks beyond the number of modalities stay idle);
a rank trains its own modalities one after another on ``cuda:LOCAL_RANK`` when it has a GPU,
else on its share of the host's CPU cores, checkpointing into ``OUT.partial/`` on its own disk.
Nothing is shared while training (SDML's networks share only the fixed P), so there are no
gradient collectives: gloo serves CPU and GPU hosts alike, and only three things travel over the
process group:

- progress: every finished epoch goes into torchrun's key-value store, and rank 0 shows every
  modality's progress from it;
- failure: a rank whose modality fails puts one message (rank, host, modality, error) there;
  every rank watches for it and the whole job stops with that message and a non-zero status;
- results: each rank's trained modalities (safetensors bytes + a JSON record: nothing
  unpickled from disk) are gathered to rank 0, which writes the bundle and prints the tables.

Every rank plans from the dataset's shapes (sdml_ext.data.describe_dataset reads them from the
arrays' headers), so it knows its modalities before reading features, and a rank other than 0
reads only those (rank 0 reads everything: it evaluates the bundle). A rank that vanishes without
a word (kill -9, out of memory) is named, with its host and modalities, by the heartbeats every
rank counts in the store (Job.lost_ranks).

A restarted job (``torchrun --max-restarts``, or the same command run again) finds each rank's
checkpoints and continues from them; the bundle is the one an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from ..errors import JobStopped, WorkerCrash, WorkerError
from ..store.files import safetensors_metadata
from ..wording import plural
from .strategies import RunReport, _peak_rss_bytes, train_tasks, usable_cores
from .training import EpochStats, ModalityResult, ModalityTask

# A rank waits in the final gather for the slowest one, which may train for hours; failures do
# not wait for this timeout (see the module docstring).
_TIMEOUT = _dt.timedelta(days=7)
_POLL_S = 0.5
_STORE_TIMEOUT = _dt.timedelta(minutes=30)  # how long ranks wait for each other to start
_LOST_AFTER_S = 8 * _POLL_S  # a heartbeat standing still this long: the rank is gone


def launched() -> bool:
    """Whether this process is a rank started by torchrun (or another torch.distributed launcher)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def assign_ranks(costs: Sequence[tuple[int, float]], world_size: int) -> dict[int, int]:
    """Modality index -> rank, for (index, cost) pairs: longest first, each to the rank with the
    least cost so far (ties: the lowest rank). Every rank computes it from the same shapes and
    options (training.training_cost), so every rank gets the same plan before reading data."""
    load = [0.0] * world_size
    out = {}
    for index, cost in sorted(costs, key=lambda c: (-c[1], c[0])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += cost
        out[index] = rank
    return out


def encode_result(result: ModalityResult) -> bytes:
    """A trained modality as bytes: its tensors as safetensors, the rest as JSON in the header."""
    record = {k: v for k, v in asdict(result).items() if k != "state"}
    return save_arrays({k: np.ascontiguousarray(v) for k, v in result.state.items()},
                       metadata={"result": json.dumps(record)})


_PAYLOAD_FIELDS = {"rank": int, "host": str, "device": str, "wall_s": (int, float), "peak_rss_bytes": int,
                   "device_peak_bytes": dict, "results": list}


def encode_payload(payload: dict) -> bytes:
    """A rank's payload (JSON fields; "results": encode_result bytes) as bytes: an 8-byte
    little-endian length, the JSON record (results replaced by their lengths), the results."""
    blobs = payload["results"]
    record = json.dumps({**payload, "results": [len(b) for b in blobs]}).encode()
    return len(record).to_bytes(8, "little") + record + b"".join(blobs)


def decode_payload(data: bytes) -> dict:
    """:func:`encode_payload`'s bytes, checked field by field (nothing is unpickled); ValueError
    naming the field of a malformed payload."""
    if len(data) < 8 or 8 + int.from_bytes(data[:8], "little") > len(data):
        raise ValueError("a rank's results are truncated")
    n = int.from_bytes(data[:8], "little")
    record = json.loads(data[8 : 8 + n])
    if not isinstance(record, dict) or set(record) != set(_PAYLOAD_FIELDS):
        raise ValueError(f"a rank's results have the fields {sorted(record) if isinstance(record, dict) else record!r}, "
                         f"expected {sorted(_PAYLOAD_FIELDS)}")
    for key, kind in _PAYLOAD_FIELDS.items():
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise ValueError(f"a rank's results: {key} is not a {getattr(kind, '__name__', 'number')}")
    sizes = record["results"]
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in sizes) or 8 + n + sum(sizes) != len(data):
        raise ValueError("a rank's results: the result sizes do not add up to the bytes received")
    blobs, at = [], 8 + n
    for k in sizes:
        blobs.append(data[at : at + k])
        at += k
    return {**record, "results": blobs}


def gather_bytes(data: bytes, job) -> list[bytes] | None:
    """Every rank's `data` at rank 0 (None elsewhere), as uint8 tensors: sizes first, then the
    bytes padded to the longest (what gather_object does, without pickling)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(job.world_size)]
    dist.all_gather(sizes, size)
    lengths = [int(t.item()) for t in sizes]
    buffer = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    if data:
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    received = [torch.empty_like(buffer) for _ in range(job.world_size)] if job.is_main else None
    dist.gather(buffer, received, dst=0)
    if not job.is_main:
        return None
    return [t[:k].cpu().numpy().tobytes() for t, k in zip(received, lengths)]


def decode_result(data: bytes) -> ModalityResult:
    record = json.loads(safetensors_metadata(data)["result"])
    record["history"] = [EpochStats(**s) for s in record["history"]]
    return ModalityResult(state=load_arrays(data), **record)


class Job:
    """This rank's view of the job: rank, world size, host, device, the shared store."""

    def __init__(self):
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.host = socket.gethostname()
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        self.prefix = f"sdml/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/attempt-{self.attempt}/"
        self.store = None
        self.plan: dict[int, list[str]] = {}  # rank -> the modalities it trains (set_plan)
        self._stop = threading.Event()

    def __enter__(self) -> Job:
        # Our own namespace in the launcher's store, one per attempt: after a torchrun restart
        # the store still holds the previous attempt's keys, and gloo, given the default
        # (unprefixed) store, can read the dead ranks' addresses from it and fail to connect.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                             is_master=not agent_store and self.rank == 0, timeout=_STORE_TIMEOUT)
        self.store = dist.PrefixStore(self.prefix, base)
        dist.init_process_group("gloo", store=dist.PrefixStore("pg/", self.store), rank=self.rank,
                                world_size=self.world_size, timeout=_TIMEOUT)
        self.store.set(f"host/{self.rank}", self.host)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        """cuda:(LOCAL_RANK mod the host's GPUs) on a host with GPUs (more ranks than GPUs share
        them: SDML's ranks exchange no gradients, so two on one GPU only share its time); else
        CPU with this rank's core share."""
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        torch.set_num_threads(max(1, usable_cores() // self.local_world_size))
        return "cpu"

    def where(self) -> str:
        return f"rank {self.rank} on {self.host}"

    def set_plan(self, names: Sequence[str], assignment: dict[int, int]) -> None:
        self.plan = {r: [n for i, n in enumerate(names) if assignment[i] == r] for r in range(self.world_size)}

    # -- a rank that vanished (kill -9, out of memory, its machine gone) --------------------
    #
    # Such a rank says nothing. Every rank's watch thread counts a heartbeat in the store; a
    # rank that finished its part marks itself done, and a rank stopped by the launcher (which
    # sends SIGTERM to the survivors once it sees one of its ranks die) marks itself stopped.
    # The rank whose heartbeat stands still, neither done nor stopped, is the one lost.

    def mark(self, what: str) -> None:
        with contextlib.suppress(Exception):
            self.store.set(f"{what}/{self.rank}", "1")

    def lost_ranks(self) -> list[int]:
        """The ranks that stopped beating without finishing or being stopped (waits a few
        heartbeats to tell)."""
        def beats():
            return {r: self.store.add(f"beat/{r}", 0) for r in range(self.world_size)}

        def accounted(r):
            return self.store.check([f"done/{r}"]) or self.store.check([f"stopped/{r}"])

        first = beats()
        deadline = time.monotonic() + _LOST_AFTER_S
        lost = set(range(self.world_size)) - {self.rank}
        while lost and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            now = beats()
            lost = {r for r in lost if now[r] == first[r] and not accounted(r)}
        return sorted(lost)

    def describe_lost(self, lost: Sequence[int]) -> str:
        parts = []
        for r in lost:
            host = self.store.get(f"host/{r}").decode() if self.store.check([f"host/{r}"]) else "an unknown host"
            names = ", ".join(self.plan.get(r, [])) or "nothing (idle)"
            parts.append(f"rank {r} on {host} (training {names})")
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) - self.attempt
        then = (f"torchrun restarts every rank from its checkpoints ({restarts} restart(s) left)" if restarts > 0
                else "the job stops")
        return f"{' and '.join(parts)} ended without a word (killed, out of memory, or its machine gone); {then}"

    # -- progress and failure, through the store --------------------------------------------

    def publish_epoch(self, stats: EpochStats) -> None:
        self.store.set(f"epoch/{stats.modality}/{stats.epoch}", json.dumps(asdict(stats)))

    def fail(self, message: str) -> None:
        """Tell every rank the job failed (the first message wins)."""
        if self.store.add(f"failures", 1) == 1:
            self.store.set(f"failed", message)

    def failure(self) -> str | None:
        if self.store.check([f"failed"]):
            return self.store.get(f"failed").decode()
        return None

    def watch(self, names: Sequence[str], epochs: int, on_epoch: Callable[[EpochStats], None] | None,
              on_failure: Callable[[str], None]) -> Callable[[], None]:
        """Start a thread that feeds every modality's epochs to `on_epoch` (rank 0) and calls
        `on_failure(message)` once another rank has failed. Returns ``finish()``, which stops
        the thread after one last pass (every epoch published so far is shown)."""
        next_epoch = dict.fromkeys(names, 1)

        def poll() -> bool:
            self.store.add(f"beat/{self.rank}", 1)
            message = self.failure()
            if message is not None:
                on_failure(message)
                return False
            if on_epoch is not None:
                for name in names:
                    while next_epoch[name] <= epochs:
                        key = f"epoch/{name}/{next_epoch[name]}"
                        if not self.store.check([key]):
                            break
                        on_epoch(EpochStats(**json.loads(self.store.get(key))))
                        next_epoch[name] += 1
            return True

        def loop():
            try:
                while poll() and not self._stop.wait(_POLL_S):
                    pass
            except Exception:  # the store went away: the job is ending
                return

        thread = threading.Thread(target=loop, name="sdml-job-watch", daemon=True)
        thread.start()

        def finish():
            self._stop.set()
            thread.join()
            poll()

        return finish


#: What ends this process at once, from any thread: called with the job's one-line failure
#: message (None where another rank prints it). Supplied by the command line, which alone decides
#: how a process exits (see sdml_ext.cli.stop_process).
StopProcess = Callable[[str | None], None]


def train_distributed(job: Job, names: Sequence[str], costs: dict[int, float], assignment: dict[int, int],
                      mine: Sequence[ModalityTask], epochs: int, checkpoints, on_epoch,
                      stop_process: StopProcess) -> RunReport | None:
    """Train this rank's tasks `mine` (its share of `names` under `assignment`, index -> rank,
    planned from `costs`, index -> training_cost); rank 0 gets every modality back in a
    RunReport (the other ranks get None). A failure anywhere ends every rank with one message
    naming the rank, host and modality: raised as JobStopped in this thread; when another rank
    fails, the watch thread calls `stop_process` (this rank may be inside a long computation or
    a collective that would not notice an exception)."""
    job.set_plan(names, assignment)
    if job.is_main:
        plan = ", ".join(f"rank {r}: {', '.join(job.plan[r]) or 'idle'}" for r in range(job.world_size))
        print(f"\ndistributed over {plural(job.world_size, 'rank')} ({plan})", file=sys.stderr, flush=True)
        job.store.set("costs", json.dumps(sorted(costs.items())))  # what every rank's plan must match
    lock = threading.Lock()

    def show(stats):
        with lock:
            on_epoch(stats)

    failed_here = threading.Event()  # this rank's own failure: it says so itself (JobStopped), not silently

    def on_failure(message: str) -> None:
        if not failed_here.is_set():
            stop_process(message if job.is_main else None)

    finish_watch = job.watch(list(names), epochs, show if job.is_main else None, on_failure)
    device = job.device()
    start = time.perf_counter()
    report = None
    try:
        if mine:
            try:
                _check_same_plan(job, names, costs)
                report = train_tasks(mine, "serial", [device], on_epoch=job.publish_epoch, checkpoints=checkpoints)
            except (WorkerError, ValueError, FloatingPointError, MemoryError) as exc:
                message = f"{job.where()}: {exc}"
                failed_here.set()
                job.fail(message)
                if job.is_main:
                    raise JobStopped(message) from None
                _await_abort(message)
        payload = {
            "rank": job.rank,
            "host": job.host,
            "device": device,
            "wall_s": time.perf_counter() - start,
            "peak_rss_bytes": _peak_rss_bytes(),
            "device_peak_bytes": report.device_peak_bytes if report else {},
            "results": [encode_result(r) for r in (report.modalities if report else [])],
        }
        try:
            blobs = gather_bytes(encode_payload(payload), job)  # bytes and JSON: nothing is unpickled
            gathered = [decode_payload(b) for b in blobs] if job.is_main else None
        except RuntimeError as exc:  # a rank died (killed, out of memory): say which, if it can be told
            _report_lost_rank(job)
            raise WorkerCrash(f"{job.where()}: lost another rank of the job ({str(exc).splitlines()[0][:200]})") from None
    except KeyboardInterrupt:  # SIGTERM from the launcher, which stops the job when a rank dies
        job.mark("stopped")
        _report_lost_rank(job)
        raise
    job.mark("done")
    finish_watch()
    if not job.is_main:
        return None
    by_index = {}
    for part in gathered:
        for data in part["results"]:
            result = decode_result(data)
            result.device = f"{part['device']} (rank {part['rank']} on {part['host']})"
            by_index[result.index] = result
    return RunReport(
        strategy="distributed",
        devices=sorted({f"{p['host']}:{p['device']}" for p in gathered}),
        wall_s=max(p["wall_s"] for p in gathered),
        peak_rss_bytes=sum(p["peak_rss_bytes"] for p in gathered),
        modalities=[by_index[i] for i in sorted(assignment)],
        device_peak_bytes={f"{p['host']}:{d}": b for p in gathered for d, b in p["device_peak_bytes"].items()},
        plan={"ranks": job.world_size, "assignment": {n: assignment[i] for i, n in enumerate(names)}},
    )


def _check_same_plan(job: Job, names: Sequence[str], costs: dict[int, float]) -> None:
    """Every rank planned from its own copy of the data: it must be rank 0's plan."""
    if job.is_main:
        return
    theirs = dict(json.loads(job.store.get("costs")))
    differ = [n for i, n in enumerate(names) if theirs.get(i) != costs[i]]
    if differ or len(theirs) != len(costs):
        raise ValueError(f"modality {(differ or names)[0]!r}: this host's copy of the data has other shapes than "
                         "rank 0's; every host needs the same data")


def _report_lost_rank(job: Job) -> None:
    """This rank was stopped, or lost a peer: if a rank of the job failed or vanished, raise
    JobStopped (for a vanished rank, the lowest surviving rank's says which: rank, host,
    modalities). Returns when no rank vanished (the job was stopped on purpose)."""
    previous = None
    with contextlib.suppress(ValueError):  # only the main thread sets handlers
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's SIGTERM: finish telling first
    try:
        failed = job.failure() is not None  # a rank failed and said so itself
        lost = [] if failed else job.lost_ranks()
    except Exception:  # the store is gone with its host: nothing more can be told
        failed, lost = False, []
    if not (failed or lost):
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        return
    says = lost and job.rank == min(r for r in range(job.world_size) if r not in lost)
    raise JobStopped(job.describe_lost(lost) if says else None) from None


def _await_abort(message: str) -> None:
    """A failed rank other than 0: rank 0 prints the message and ends the job; if rank 0 is gone
    already, this rank says it (JobStopped)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun ending the job: no second message
    time.sleep(5 * _POLL_S)
    raise JobStopped(message) from None


def barrier() -> None:
    dist.barrier()
