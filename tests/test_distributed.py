"""torchrun: modalities as ranks (gloo, CPU), results gathered to rank 0, one node or two, a
failing rank, a killed rank restarted by torchrun. Every job runs in its own process group,
on free ports, and nothing of it may survive the test."""

import os
import signal
import socket

import numpy as np
import pytest

from helpers import small_tasks
from processes import EVERY_EPOCH, SMALL_RUN, TORCHRUN, TRAIN, Run, assert_same_bundle, free_port, pymp_dirs

from sdml_ext.data import load_dataset
from sdml_ext.engine.distributed import assign_ranks, decode_result, encode_result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    (path / "run.toml").write_text(SMALL_RUN)
    return path


@pytest.fixture(scope="module")
def reference(workdir):
    out = workdir / "serial"
    with Run([*TRAIN, "--config", str(workdir / "run.toml"), "--strategy", "serial", "--out", str(out)], workdir,
             EVERY_EPOCH) as run:
        code, _, err = run.finish()
    assert code == 0, err
    return out


def torchrun(workdir, out, *launch, config="run.toml"):
    return [*TORCHRUN, *launch, "--monitor-interval=0.5", "-m", "sdml_ext.train",
            "--config", str(workdir / config), "--out", str(out)]


def finish(run, expect=0):
    code, stdout, err = run.finish(timeout_s=240)
    assert code == expect, err[-3000:]
    assert run.gone() == []  # agents, ranks, workers: all gone
    return stdout, err


def test_two_ranks_on_one_node_give_the_serial_bundle(workdir, reference):
    out = workdir / "standalone"
    with Run(torchrun(workdir, out, "--standalone", "--nproc-per-node=2"), workdir, EVERY_EPOCH) as run:
        stdout, err = finish(run)
    assert "rank 0: m0, rank 1: m1, m2" in err and "whole run (distributed)" in stdout and "mAP@all" in stdout
    # Rank 0 showed the progress of every modality, its own and the other rank's.
    assert all(f"m{i}: 4 epochs" in err for i in range(3))
    assert not (workdir / "standalone.partial").exists()
    assert_same_bundle(out, reference)


def two_nodes(workdir, nodes, config="run.toml", expect=0):
    """Two torchrun agents on localhost with c10d rendezvous, one rank each, node i in the
    directory nodes[i] (made here unless it exists); (stdout, stderr) of each."""
    port = free_port()
    runs = []
    try:
        for rank, node in enumerate(nodes):
            node.mkdir(exist_ok=True)
            launch = ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=sdml-test-{port}"]
            runs.append(Run(torchrun(workdir, "bundle", *launch, config=config), node, EVERY_EPOCH))
        if expect == 0:
            return [finish(run) for run in runs]
        results = [run.finish(timeout_s=240) for run in runs]
        assert all(run.gone() == [] for run in runs)
        assert all(code != 0 for code, _, _ in results), [r[2][-2000:] for r in results]
        return [r[1:] for r in results]
    finally:
        for run in runs:
            run.__exit__()


def test_two_nodes_without_a_shared_filesystem(workdir, reference, tmp_path):
    # Each node in its own directory: the output path is relative, so node 1's checkpoints never
    # touch node 0's disk space.
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    results = two_nodes(workdir, nodes)
    assert "mAP@all" in results[0][0] and "mAP@all" not in results[1][0]
    assert not (nodes[1] / "bundle").exists() and not (nodes[1] / "bundle.partial").exists()
    assert_same_bundle(nodes[0] / "bundle", reference)


@pytest.fixture(scope="module")
def npz_run(workdir):
    """The small run's data as a generic .npz (the data path is relative: each node has its own copy)."""
    from sdml_ext.data import make_synthetic, to_arrays

    (workdir / "npz.toml").write_text(SMALL_RUN.split("[dataset_options]")[0].replace(
        'dataset = "synthetic"', 'dataset = "npz"\ndata = "data.npz"'))
    return to_arrays(make_synthetic(n_modalities=3, n_classes=5, n_train=150, n_val=50, n_test=60))


def test_a_rank_reads_only_its_own_modalities(workdir, reference, npz_run, tmp_path):
    # No shared filesystem: node 1's copy of the data lacks the features of m0 (rank 0's
    # modality): their headers are intact, their data is missing, so reading them fails. Rank 1
    # plans from the headers and reads m1 and m2 only.
    from data_files import write_generic

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, unreadable in zip(nodes, ([], [k for k in npz_run if k.startswith("m0_") and k.endswith("_x")])):
        node.mkdir()
        write_generic("npz", node / "data.npz", npz_run, unreadable=unreadable)
    results = two_nodes(workdir, nodes, config="npz.toml")
    assert "rank 0: m0, rank 1: m1, m2" in results[0][1]
    with pytest.raises(ValueError, match="cannot read key 'm0_train_x'"):  # node 1's copy bites
        load_dataset("npz", nodes[1] / "data.npz")
    assert_same_bundle(nodes[0] / "bundle", reference)


def test_a_host_with_other_data_fails_the_job_naming_it(workdir, npz_run, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, rows in zip(nodes, (150, 140)):  # node 1's m1 has fewer rows
        node.mkdir()
        arrays = {**npz_run, "m1_train_x": npz_run["m1_train_x"][:rows], "m1_train_y": npz_run["m1_train_y"][:rows]}
        np.savez(node / "data.npz", **arrays)
    results = two_nodes(workdir, nodes, config="npz.toml", expect=1)
    # Rank 0 says it in one line (node 1, told nothing by node 0, says it too after a while).
    lines = [line for line in results[0][1].splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"rank 1 on {socket.gethostname()}: modality 'm1': this host's copy" in lines[0], lines
    assert not (nodes[0] / "bundle").exists()


def test_a_killed_rank_fails_the_job_with_one_message_naming_its_modalities(workdir):
    out = workdir / "killed"
    with Run(torchrun(workdir, out, "--standalone", "--nproc-per-node=2"), workdir, EVERY_EPOCH,
             pause_at="epoch:m1:2") as run:
        os.kill(run.wait_paused(), signal.SIGKILL)
        run.release()
        code, _, err = run.finish(timeout_s=240)
        assert run.gone() == []
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: rank 1 on {socket.gethostname()} (training m1, m2) ended without a word (killed, "
                     "out of memory, or its machine gone); the job stops"], err[-3000:]
    assert not out.exists()


def test_a_killed_rank_is_restarted_and_every_rank_resumes(workdir, reference):
    out = workdir / "restarted"
    with Run(torchrun(workdir, out, "--standalone", "--nproc-per-node=2", "--max-restarts=1"), workdir,
             EVERY_EPOCH, pause_at="epoch:m1:2") as run:
        rank1 = run.wait_paused()
        os.kill(rank1, signal.SIGKILL)
        run.release()
        _, err = finish(run)
    # Rank 0 said which rank was lost and what it trained; torchrun restarted the worker group.
    assert f"rank 1 on {socket.gethostname()} (training m1, m2) ended without a word" in err
    assert "torchrun restarts every rank from its checkpoints (1 restart(s) left)" in err
    assert_same_bundle(out, reference)


def test_a_failing_rank_fails_the_job_with_one_message(workdir):
    # m1 has fewer samples than a batch: it cannot train; it is rank 1's.
    (workdir / "bad.toml").write_text(SMALL_RUN.replace("n_train = 150", "n_train = [150, 20, 150]"))
    out = workdir / "failed"
    before = pymp_dirs()
    with Run(torchrun(workdir, out, "--standalone", "--nproc-per-node=2", config="bad.toml"), workdir,
             EVERY_EPOCH) as run:
        code, _, err = run.finish(timeout_s=240)
        assert run.gone() == []
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert f"rank 1 on {socket.gethostname()}" in lines[0] and "'m1'" in lines[0] and "fewer than the batch size" in lines[0]
    assert not out.exists()
    assert pymp_dirs() <= before  # ranks ended by the failure leave no temporary directory


def test_assignment_is_longest_first_and_results_travel_as_safetensors(tmp_path):
    from sdml_ext.data import make_synthetic
    from sdml_ext.engine.training import ModalityTrainer, training_cost

    ds = make_synthetic(4, dims=[400, 10, 10, 10], n_train=100, n_val=10, n_test=10, n_classes=3)
    tasks = small_tasks(ds, epochs=4)
    costs = [(t.index, t.cost()) for t in tasks]
    assert costs[1][1] == training_cost(100, 10, tasks[1].options)  # the plan needs only shapes
    assert assign_ranks(costs, 2) == {0: 0, 1: 1, 2: 1, 3: 1}
    assert assign_ranks(costs, 6) == {0: 0, 1: 1, 2: 2, 3: 3}  # ranks 4 and 5 stay idle
    result = ModalityTrainer(tasks[1]).run()
    back = decode_result(encode_result(result))
    assert back.state.keys() == result.state.keys() and all((back.state[k] == result.state[k]).all() for k in back.state)
    assert back.history == result.history and back.best_epoch == result.best_epoch
