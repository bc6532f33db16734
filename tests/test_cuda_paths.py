"""Every path that puts work on a GPU, each against the CPU result of the same settings: the
training strategies (serial, joint, parallel on streams, parallel over cuda:0 listed twice),
``--resume`` after a kill, ``--add-modality``, torchrun with two ranks sharing one GPU,
``evaluate --device``, ``search build`` / ``query`` with the index on a GPU (streamed and
``--in-memory``) and a bundle loaded onto a GPU.

"The same model" across devices: CUDA and CPU GEMMs sum in different orders, so weights differ
by rounding, and Adam, which divides by the gradient's running magnitude, carries a rounding
difference on a weight whose gradient is ~0 into an update of up to the learning rate. Weights
are therefore compared in the aggregate: the distance between the CUDA and CPU weights must be
under 1% of the distance training moved them from their (seeded, shared) initial values, and
the loss trajectories agree to 2e-3. Rankings are compared exactly, on data whose classes are
well apart. On a host without CUDA every test here skips (the GPU check runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import sdml_ext
from helpers import CUDA_MARKS, run_config
from processes import EVERY_EPOCH, TORCHRUN, TRAIN, Run, assert_same_bundle
from sdml_ext.data import make_synthetic, save_npz
from sdml_ext.model import DSAE, make_projection
from sdml_ext.engine.strategies import STRATEGIES, train_tasks
from sdml_ext.engine.training import TrainOptions, make_tasks

GPU = "cuda:0"
pytestmark = CUDA_MARKS  # every test here needs a GPU

# 3 synthetic modalities, 4 epochs, small networks; classes well apart (low noise).
DATA = {"n_train": 200, "n_val": 50, "n_test": 60, "n_classes": 5, "n_modalities": 3, "noise": 0.2}
RUN = run_config(DATA, dataset="synthetic", epochs=4, hidden=[48, 48], code_dim=16, lr=[1e-3], batch_size=50)


def initial_state(model_options: dict, seed: int) -> dict[str, np.ndarray]:
    """A modality's initial weights, drawn as the trainer draws them (its seed, the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DSAE(**model_options)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def assert_same_model(cpu: dict, gpu: dict, init: dict, where: str, ratio: float = 1e-2) -> None:
    """‖gpu − cpu‖ ≤ ratio · ‖cpu − init‖ over the network's tensors; stored preprocessing equal."""
    diff = moved = 0.0
    for key, value in cpu.items():
        if key in init:
            diff += float(np.sum((gpu[key].astype(np.float64) - value) ** 2))
            moved += float(np.sum((value.astype(np.float64) - init[key]) ** 2))
        else:  # fitted on the CPU from the same data whatever the device
            np.testing.assert_array_equal(gpu[key], value, err_msg=f"{where} {key}")
    assert moved > 0, f"{where}: training did not move the weights"
    assert diff**0.5 <= ratio * moved**0.5, f"{where}: CUDA weights {diff**0.5:.2e} from CPU's, training moved {moved**0.5:.2e}"


def assert_same_results(cpu_results, gpu_results, where: str) -> None:
    for a, b in zip(cpu_results, gpu_results):
        assert (a.name, a.best_epoch) == (b.name, b.best_epoch), where
        assert_same_model(a.state, b.state, initial_state(a.model_options, a.seed), f"{where} {a.name}")
        for field in ("train_loss", "val_loss"):
            np.testing.assert_allclose([getattr(s, field) for s in b.history], [getattr(s, field) for s in a.history],
                                       rtol=2e-3, err_msg=f"{where} {a.name} {field}")


def bundle_states(path: Path) -> dict[str, tuple[dict, dict]]:
    """name -> (tensors, manifest entry) of a bundle's modalities."""
    manifest = json.loads((path / "manifest.json").read_text())
    return {m["name"]: (load_file(str(path / m["file"])), m) for m in manifest["modalities"]}


def assert_same_bundle_models(cpu: Path, gpu: Path) -> None:
    a, b = bundle_states(cpu), bundle_states(gpu)
    assert a.keys() == b.keys()
    for name, (tensors, entry) in a.items():
        assert entry["training"]["best_epoch"] == b[name][1]["training"]["best_epoch"], name
        init = initial_state(entry["model"], entry["training"]["seed"])
        assert_same_model(tensors, b[name][0], init, f"bundle {name}")


def run(argv, cwd, env=None, timeout=240):
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def tasks():
    ds = make_synthetic(3, dims=[300, 40, 29], n_train=[430, 250, 200], n_val=40, n_test=20, n_classes=5,
                        noise=0.2, seed=4)
    opts = TrainOptions(hidden=(64, 64), code_dim=16, batch_size=50, epochs=3, lr=(1e-3,))
    return make_tasks(ds, make_projection(opts.code_dim, ds.num_classes, opts.seed), opts)


@pytest.fixture(scope="module")
def cpu_run(tasks):
    return train_tasks(tasks, "serial", devices=["cpu"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda_runs")
    (path / "run.toml").write_text(RUN)
    return path


@pytest.fixture(scope="module")
def cpu_bundle(workdir):
    out = workdir / "cpu"
    run([*TRAIN, "--config", "run.toml", "--devices", "cpu", "--strategy", "serial", "--out", str(out)], workdir)
    return out


@pytest.fixture(scope="module")
def gpu_bundle(workdir):
    out = workdir / "gpu"
    run([*TRAIN, "--config", "run.toml", "--devices", GPU, "--strategy", "serial", "--out", str(out)], workdir,
        EVERY_EPOCH)
    return out


# ---- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_on_cuda_gives_the_cpu_models(tasks, cpu_run, strategy):
    report = train_tasks(tasks, strategy, devices=[GPU])
    assert report.device_peak_bytes[GPU] > 0
    assert_same_results(cpu_run.modalities, report.modalities, strategy)


def test_parallel_over_one_gpu_listed_twice(tasks, cpu_run):
    report = train_tasks(tasks, "parallel", devices=[GPU, GPU])
    assert set(report.plan["assignment"].values()) == {GPU}
    assert_same_results(cpu_run.modalities, report.modalities, "parallel cuda:0,cuda:0")


def test_a_fresh_process_trains_on_cuda_by_default(workdir, cpu_bundle):
    """`python -m sdml_ext.train` in a new process (devices = auto: cuda:0), the failure of the
    first GPU run: statistics were reset on a device the process had not used yet."""
    out = workdir / "auto"
    proc = run([*TRAIN, "--config", "run.toml", "--out", str(out)], workdir)  # parallel, on streams
    assert "on cuda:0" in proc.stderr
    assert_same_bundle_models(cpu_bundle, out)


def test_train_cli_on_cuda_gives_the_cpu_models(cpu_bundle, gpu_bundle):
    assert_same_bundle_models(cpu_bundle, gpu_bundle)
    manifest = json.loads((gpu_bundle / "manifest.json").read_text())
    assert all(m["training"]["device"] == "cuda:0" for m in manifest["modalities"])


def test_resume_after_a_kill_on_cuda_gives_the_uninterrupted_bundle(workdir, gpu_bundle):
    out = workdir / "killed"
    argv = [*TRAIN, "--config", "run.toml", "--devices", GPU, "--strategy", "serial", "--out", str(out)]
    with Run(argv, workdir, EVERY_EPOCH, pause_at="epoch:m1:2") as proc:
        proc.wait_paused()
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.finish(timeout_s=60)
    assert (workdir / "killed.partial").is_dir() and not out.exists()
    run([*TRAIN, "--resume", str(workdir / "killed.partial")], workdir, EVERY_EPOCH)
    assert_same_bundle(gpu_bundle, out)  # the same device and path: bit for bit


def test_add_modality_on_cuda(workdir):
    """Two modalities trained, a third added later, all on cuda:0, against the same on the CPU."""
    outs = {}
    for tag, device in (("cpu", "cpu"), ("gpu", GPU)):
        out = workdir / f"add-{tag}"
        run([*TRAIN, "--config", "run.toml", "--modalities", "m0,m1", "--epochs", "3", "--devices", device,
             "--strategy", "serial", "--out", str(out)], workdir)
        run([*TRAIN, "--add-modality", "m2", "--into", str(out), "--devices", device], workdir)
        outs[tag] = out
    assert_same_bundle_models(outs["cpu"], outs["gpu"])
    manifest = json.loads((outs["gpu"] / "manifest.json").read_text())
    assert [m["name"] for m in manifest["modalities"]] == ["m0", "m1", "m2"]
    assert manifest["modalities"][2]["training"]["device"] == GPU


def test_torchrun_two_ranks_share_one_gpu(workdir, cpu_bundle):
    out = workdir / "dist"
    argv = [*TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "sdml_ext.train",
            "--config", "run.toml", "--out", str(out)]
    proc = run(argv, workdir, EVERY_EPOCH, timeout=300)
    manifest = json.loads((out / "manifest.json").read_text())
    devices = {m["training"]["device"] for m in manifest["modalities"]}
    assert all(d.startswith("cuda:0 (rank") for d in devices) and len({d.split()[2] for d in devices}) == 2, devices
    assert_same_bundle_models(cpu_bundle, out)
    assert "Traceback" not in proc.stderr


# ---- evaluation, search, bundles --------------------------------------------------------------------


def test_bundle_loads_onto_cuda_and_encodes_as_on_cpu(gpu_bundle):
    ds = make_synthetic(**DATA, seed=0)
    cpu, gpu = sdml_ext.load(gpu_bundle), sdml_ext.load(gpu_bundle, "cuda")
    assert gpu.device == torch.device("cuda", 0)
    for name in ds.modality_names:
        x = ds[name].test.features
        np.testing.assert_allclose(gpu.encode(name, x).numpy(), cpu.encode(name, x).numpy(), atol=1e-5)
        # CUDA input as well
        np.testing.assert_allclose(gpu.encode(name, torch.from_numpy(x).cuda()).numpy(), cpu.encode(name, x).numpy(), atol=1e-5)


def test_evaluate_on_cuda_gives_the_cpu_tables(workdir, gpu_bundle):
    tables = {}
    for tag, device in (("cpu", "cpu"), ("gpu", GPU)):
        out = workdir / f"eval-{tag}"
        run([sys.executable, "-m", "sdml_ext.evaluate", str(gpu_bundle), "--device", device, "--out", str(out)], workdir)
        tables[tag] = json.loads((out / "metrics.json").read_text())
    for metric in ("map_all", "map_at_50"):
        np.testing.assert_allclose(np.array(tables["gpu"][metric]["table"], dtype=float),
                                   np.array(tables["cpu"][metric]["table"], dtype=float), atol=1e-9, err_msg=metric)


@pytest.mark.parametrize("in_memory", [False, True])
def test_search_on_cuda_ranks_as_on_cpu(workdir, gpu_bundle, in_memory):
    data = workdir / "search.npz"
    if not data.exists():
        save_npz(make_synthetic(**DATA, seed=0), data)
    hits = {}
    for name, device in (("cpu", "cpu"), ("gpu", GPU)):
        tag = f"{name}-{int(in_memory)}"
        index = workdir / f"m0-{tag}.index"
        if not index.exists():
            run([sys.executable, "-m", "sdml_ext.search", "build", str(gpu_bundle), "--modality", "m0", "--features",
                 str(data), "--device", device, "--out", str(index)], workdir)
        out = workdir / f"hits-{tag}.json"
        run([sys.executable, "-m", "sdml_ext.search", "query", str(index), "--modality", "m1", "--features", str(data),
             "-k", "10", "--device", device, "--out", str(out), *(["--in-memory"] if in_memory else [])], workdir)
        hits[name] = json.loads(out.read_text())
    cpu, gpu = hits["cpu"], hits["gpu"]
    assert [q["ids"] for q in gpu["results"]] == [q["ids"] for q in cpu["results"]]
    np.testing.assert_allclose([q["scores"] for q in gpu["results"]], [q["scores"] for q in cpu["results"]], atol=1e-5)
    assert gpu["metrics"] == pytest.approx(cpu["metrics"])


def test_search_api_on_cuda_ids_and_labels_of_gpu_rows(gpu_bundle):
    from sdml_ext.search import build_index

    ds = make_synthetic(**DATA, seed=0)
    bundle = sdml_ext.load(gpu_bundle, GPU)
    m0, m1 = ds["m0"].test, ds["m1"].test
    index = build_index(bundle, "m0", m0.features, ids=np.arange(m0.n) + 1000, labels=m0.labels)
    assert index.codes().is_cuda
    scores, ids = index.search(m1.features, k=5, modality="m1")
    rows = index.search_codes(index.encode(m1.features, "m1"), 5).indices
    assert torch.equal(ids, rows + 1000)
    assert torch.equal(index.ids_of(rows.cuda()), ids)  # rows given on the GPU too
    assert torch.equal(index.labels_of(rows.cuda()), torch.from_numpy(m0.labels)[rows])
