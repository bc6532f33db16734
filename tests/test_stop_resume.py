"""Stopping a training run at any moment (SIGTERM, SIGINT, SIGKILL; after some epochs, during
the final save) leaves no half-written bundle and no process or temporary file behind, and
``--resume`` finishes it with the bundle an uninterrupted run writes. Concurrent writers of one
bundle never lose each other's work."""

import os
import signal
import time
from pathlib import Path

import pytest

from processes import EVERY_EPOCH, SMALL_RUN, TRAIN, Run, assert_same_bundle, pymp_dirs

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs")
    (path / "run.toml").write_text(SMALL_RUN)
    return path


def train(workdir, out, *flags, strategy="serial"):
    return [*TRAIN, "--config", str(workdir / "run.toml"), "--strategy", strategy, "--out", str(out), *flags]


@pytest.fixture(scope="module")
def reference(workdir):
    out = workdir / "reference"
    with Run(train(workdir, out), workdir, EVERY_EPOCH) as run:
        code, _, err = run.finish()
    assert code == 0, err
    return out


def shm_semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def resume(workdir, out):
    with Run([*TRAIN, "--resume", f"{out}.partial"], workdir, EVERY_EPOCH) as run:
        code, stdout, err = run.finish()
    assert code == 0, err
    assert "resuming" in err and not Path(f"{out}.partial").exists()
    return stdout, err


@pytest.mark.parametrize("strategy,sig,pause_at,status", [
    ("serial", signal.SIGTERM, "epoch:m1:2", 143),
    ("serial", signal.SIGINT, "epoch:m0:1", 130),
    ("parallel", signal.SIGTERM, "epoch:m0:2", 143),
])
def test_signal_stops_the_run_cleanly_and_resume_gives_the_same_bundle(workdir, reference, strategy, sig, pause_at, status):
    out = workdir / f"{strategy}-{sig.name}"
    before = pymp_dirs()
    with Run(train(workdir, out, strategy=strategy), workdir, EVERY_EPOCH, pause_at=pause_at) as run:
        run.wait_paused()
        os.kill(run.proc.pid, sig)
        start = time.monotonic()
        code, _, err = run.finish(timeout_s=60)
        assert time.monotonic() - start < 20  # stopped at once, no second signal needed
        assert run.gone() == []
    assert code == status, err
    assert f"--resume {out}.partial" in err and "interrupted" in err
    assert not out.exists() and not list(workdir.glob(f".{out.name}.tmp-*"))
    assert pymp_dirs() <= before  # multiprocessing's temporary directory went with the run
    resume(workdir, out)
    assert_same_bundle(out, reference)


def test_ctrl_c_in_a_terminal_stops_a_parallel_run_at_once(workdir):
    # A terminal sends SIGINT to the whole foreground process group: workers, fork server and all.
    out = workdir / "ctrl-c"
    with Run(train(workdir, out, strategy="parallel"), workdir, EVERY_EPOCH, pause_at="epoch:m0:1") as run:
        run.wait_paused()
        os.killpg(run.proc.pid, signal.SIGINT)
        start = time.monotonic()
        code, _, err = run.finish(timeout_s=60)
        assert time.monotonic() - start < 20
        assert run.gone() == []
    assert code == 130, err


def test_sigkill_of_a_parallel_run_leaves_no_process_and_resumes(workdir, reference):
    out = workdir / "parallel-kill"
    shm_before = shm_semaphores()
    with Run(train(workdir, out, strategy="parallel"), workdir, EVERY_EPOCH, pause_at="epoch:m0:2") as run:
        paused = run.wait_paused()
        assert paused != run.proc.pid  # a worker process reached the pause point
        os.kill(run.proc.pid, signal.SIGKILL)
        # Workers, the fork server and the resource tracker notice the main process is gone.
        assert run.gone(timeout_s=20) == []
        run.finish()
    # The resource tracker unlinked the run's semaphores when its last client was gone. (Another
    # program's parallel run starting meanwhile would show here too: none runs in CI.)
    assert shm_semaphores() <= shm_before
    assert not out.exists()
    _, err = resume(workdir, out)
    # Its multiprocessing temporary directory, said once.
    assert err.count("removed what an interrupted run left behind") == 1 and err.count("pymp-") == 1, err
    assert_same_bundle(out, reference)


def test_kill_during_the_final_save_leaves_no_bundle_and_resumes(workdir, reference):
    out = workdir / "kill-in-save"
    with Run(train(workdir, out), workdir, EVERY_EPOCH, pause_at="bundle-save") as run:
        run.wait_paused()
        os.kill(run.proc.pid, signal.SIGKILL)
        run.finish()
    assert not out.exists() and list(workdir.glob(f".{out.name}.tmp-*"))  # the half-assembled bundle, hidden
    _, err = resume(workdir, out)
    assert f".{out.name}.tmp-" in err and not list(workdir.glob(f".{out.name}.tmp-*"))
    assert_same_bundle(out, reference)


def test_a_new_run_on_a_stopped_runs_output_is_refused_with_the_resume_command(workdir):
    out = workdir / "refused"
    with Run(train(workdir, out), workdir, EVERY_EPOCH, pause_at="epoch:m0:1") as run:
        run.wait_paused()
        os.kill(run.proc.pid, signal.SIGTERM)
        run.finish()
    with Run(train(workdir, out), workdir, EVERY_EPOCH) as again:
        code, _, err = again.finish()
    assert code == 2 and f"--resume {out}.partial" in err and "Traceback" not in err


def test_concurrent_add_modality_never_loses_one(workdir):
    base = workdir / "two"
    with Run(train(workdir, base, "--modalities", "m0,m1"), workdir, EVERY_EPOCH) as run:
        assert run.finish()[0] == 0
    add = [*TRAIN, "--into", str(base), "--add-modality"]
    # The first add is held just before it writes (as slow storage would), the second comes meanwhile.
    with Run([*add, "m2"], workdir, EVERY_EPOCH, pause_at="bundle-add") as first:
        first.wait_paused()
        with Run([*add, "m2"], workdir, EVERY_EPOCH) as second:
            code, _, err = second.finish()
        assert code == 2 and "in use by another run" in err and "Traceback" not in err
        first.release()
        code, out, err = first.finish()
        assert code == 0 and "added m2" in out, err
    import sdml_ext

    assert sdml_ext.load(base).modality_names == ["m0", "m1", "m2"]


def test_a_stopped_add_modality_resumes_to_the_same_bundle(workdir, reference):
    # m2 added to a bundle of m0, m1 has the index, seed and learning rate it has in the
    # three-modality run: the finished bundle equals the reference tensor for tensor.
    base = workdir / "added"
    with Run(train(workdir, base, "--modalities", "m0,m1"), workdir, EVERY_EPOCH) as run:
        assert run.finish()[0] == 0
    with Run([*TRAIN, "--into", str(base), "--add-modality", "m2"], workdir, EVERY_EPOCH, pause_at="epoch:m2:2") as run:
        run.wait_paused()
        os.kill(run.proc.pid, signal.SIGTERM)
        code, _, err = run.finish(timeout_s=60)
    assert code == 143 and f"--resume {base}.partial" in err
    resume(workdir, base)
    assert_same_bundle(base, reference)
