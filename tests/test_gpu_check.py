"""The GPU check script (benchmarks/gpu_check.sh) runs end to end as a dry run: every part at tiny
sizes, the CUDA-only steps skipped with their reason, at most 8 files under OUT. GPU time is scarce;
this keeps the script from rotting between the runs on a GPU host."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {**os.environ, "SDML_GPU_CHECK_DRY": "1", "OUT": str(out), "PYTHON": sys.executable}
    # The timeout only guards against a hang; nothing here is timed.
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    return proc, out


def test_dry_run_passes_and_reports_every_part(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["dry_run"] and not data["failed"]
    assert set(data["parts"]) == {"strategies", "loss", "epoch", "wiki200", "streams", "topk", "map", "graphs"}
    assert all(p["status"] == "ok" for p in data["parts"].values()), data["parts"]
    report = (out / "report.txt").read_text()
    assert report.splitlines()[-1] == "GPU CHECK: OK"
    assert all(f"{name}: " in report and f"{name}: " in proc.stdout for name in data["parts"])


def test_dry_run_checks_what_it_claims(dry_run):
    _, out = dry_run
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    # The same models from every strategy (bitwise where the thread counts agree; parallel CPU
    # workers may get another count, and another BLAS blocking, than the serial loop).
    assert parts["strategies"]["vs_serial"].keys() >= {"joint", "parallel"}
    assert all(v["close_rtol1e-4_atol1e-6"] for v in parts["strategies"]["vs_serial"].values())
    if not torch.cuda.is_available():  # on a GPU, bitwise or not is what the check reports
        assert parts["strategies"]["vs_serial"]["joint"]["bitwise_equal"]  # one process, one thread count
    # The plain PyTorch loop is the same recipe: same start, same first-epoch loss.
    assert parts["epoch"]["first_epoch_loss"]["rel_diff"] < 1e-3
    assert parts["loss"]["matches_eager"] and parts["loss"]["fused_over_floor"] > 0
    assert all(c["check_vs_cpu"] and c["exact_ids_equal_exact"] for c in parts["topk"]["cases"])
    assert all(c["check_vs_cpu"] and 0 < c["mAP"] <= 1 for c in parts["map"]["cases"])
    assert all(c["matches_eager"] for c in parts["loss"]["cases"])
    assert parts["streams"]["parallel_vs_serial_models"]["close_rtol1e-4_atol1e-6"]
    assert all(len(t) >= 1 for t in parts["wiki200"]["times_s"].values())
    # The graph path's logic (uncaptured on the CPU) gives the eager path's models, bit for bit.
    assert parts["graphs"]["graphs_vs_eager_models"]["bitwise_equal"] and parts["graphs"]["captures"] == [1, 1]
    if not torch.cuda.is_available():
        assert parts["epoch"]["first_epoch_loss"]["graphs_vs_eager_rel_diff"] == 0


def test_dry_run_runs_the_readme_commands(dry_run):
    """Training, evaluation, search build and query, and torchrun with two ranks, as typed (the
    dry run adds --epochs 1), each a step of its own that passed."""
    proc, out = dry_run
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    names = ["readme_train", "readme_evaluate", "readme_search_build", "readme_search_query", "readme_torchrun"]
    assert all(steps[n]["rc"] == "0" for n in names), {n: steps.get(n) for n in names}
    report = (out / "report.txt").read_text()
    assert all(f"{n}: ok" in report for n in names)


def test_dry_run_skips_cuda_steps_with_a_reason_and_keeps_out_small(dry_run):
    proc, out = dry_run
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["build"]["rc"] == "skipped" and steps["tests_cuda"]["rc"] == "skipped"
    assert steps["memcheck"]["rc"] == "skipped"
    if not torch.cuda.is_available():
        assert steps["retrieval"]["note"] == "no CUDA"
        assert "retrieval: skipped: no CUDA" in proc.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8 and all(p.stat().st_size <= 16 << 20 for p in files)


def test_report_says_which_part_timed_out(tmp_path):
    """A part killed by its time limit leaves no result: the report names it and fails."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "status.tsv").write_text("build\t0\t40\t180\t\nstrategies\t124\t60\t60\t\nloss\tskipped\t0\t0\tout of time\n")
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "gpu_check_parts.py"), "report",
                           "--work", str(work), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "strategies: no result (rc 124: timed out)" in proc.stdout
    assert "loss: skipped: out of time" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("GPU CHECK: FAILED: strategies")


def test_report_keeps_the_numbers_of_a_part_killed_midway(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "status.tsv").write_text("topk\t124\t90\t90\t\n")
    (work / "part_topk.json").write_text(json.dumps({"status": "incomplete", "summary": "top-k: only k in [50] finished"}))
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "gpu_check_parts.py"), "report",
                           "--work", str(work), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "topk: incomplete (rc 124): top-k: only k in [50] finished" in proc.stdout
    assert json.loads((out / "gpu_check.json").read_text())["failed"] == ["topk"]
