"""Killing a parallel run's whole process group (its resource tracker included) leaks nothing
past the next run: the semaphores it left in /dev/shm are removed by the --resume."""

import os
import signal
from pathlib import Path

from processes import EVERY_EPOCH, SMALL_RUN, TRAIN, Run


def semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def test_group_kill_of_a_parallel_run_leaks_no_semaphore_past_resume(tmp_path):
    (tmp_path / "run.toml").write_text(SMALL_RUN)
    out = tmp_path / "grp"
    before = semaphores()
    argv = [*TRAIN, "--config", str(tmp_path / "run.toml"), "--strategy", "parallel", "--out", str(out)]
    with Run(argv, tmp_path, EVERY_EPOCH, pause_at="epoch:m0:2") as run:
        run.wait_paused()
        os.killpg(run.proc.pid, signal.SIGKILL)  # the run, its workers, fork server and resource tracker
        assert run.gone(timeout_s=20) == []
        run.finish()
    with Run([*TRAIN, "--resume", f"{out}.partial"], tmp_path, EVERY_EPOCH) as run:
        code, _, err = run.finish()
    assert code == 0, err
    assert (out / "manifest.json").exists()
    assert semaphores() <= before  # (another program's parallel run meanwhile would show: none in CI)
