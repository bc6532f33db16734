"""The CPU tile GEMM is chosen by measuring (sdml/cpu_gemm.h): the SDML_CPU_GEMM override, the
per-process choice, the cache file (read, written, a bad or foreign one ignored and rewritten),
and what build_info() / ``python -m sdml_ext.info`` say. Each case runs in a fresh process: the
choice is made once per process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADER = "sdml_ext cpu gemm calibration v3"

# Prints the choice, after a float32 top-k that uses it (the kernels' results are checked by
# test_retrieval.py; here: that the call works with the choice).
PROBE = """
import json, torch, sdml_ext
from sdml_ext.ops import cosine_topk
q, g = torch.randn(40, 16), torch.randn(300, 16)
assert cosine_topk(q, g, 3).indices.shape == (40, 3)
print(json.dumps(sdml_ext.build_info()["cpu_gemm"]))
"""


def _run(tmp_path, env_changes, code=PROBE, args=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDML_CPU_GEMM")}
    env["SDML_CACHE_DIR"] = str(tmp_path / "cache")
    env.update(env_changes)
    cmd = [sys.executable, *(args or ["-c", code])]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def _choice(tmp_path, **env):
    proc = _run(tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cache_file(tmp_path) -> Path:
    return tmp_path / "cache" / "cpu_gemm_v3.txt"


def _has_avx2_fma() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx2" in flags and " fma" in flags


def test_measured_then_cached(tmp_path):
    first = _choice(tmp_path)
    assert first["how"] == "measured" and first["gemm"] in ("blas", "onednn", "avx2")
    rates = first["measured_gflops"]
    assert rates["blas"] > 0 and rates["onednn"] >= 0
    # Our kernel is measured exactly where the CPU runs it.
    assert (rates["avx2"] > 0 and rates["avx2_into_rows"] > 0) == _has_avx2_fma()
    # Top-k blocks: the faster of oneDNN and our kernel unless BLAS is more than 1/0.95 faster.
    free = "avx2" if rates["avx2"] > rates["onednn"] else "onednn"
    assert first["gemm"] == (free if rates[free] >= 0.95 * rates["blas"] else "blas")
    # Into a wider buffer: the fastest (BLAS on a tie).
    into = {g: rates[f"{g}_into_rows"] for g in ("blas", "onednn", "avx2")}
    assert into[first["gemm_into_rows"]] == max(into.values())
    assert first["cache"] == "none yet; written" and first["cache_file"] == str(_cache_file(tmp_path))
    text = _cache_file(tmp_path).read_text()
    assert text.startswith(HEADER + "\n") and f"gemm={first['gemm']}\n" in text
    second = _choice(tmp_path)
    assert second["how"] == "cached" and second["cache"] == "read"
    assert (second["gemm"], second["gemm_into_rows"]) == (first["gemm"], first["gemm_into_rows"])
    assert second["measured_gflops"] == pytest.approx(rates, rel=1e-5)  # 6 digits kept


def _record(**changes) -> bytes:
    """A well-formed cache record (for no machine in particular) with some fields changed."""
    fields = dict(machine="x", gemm="blas", gemm_into_rows="blas", blas_gflops="1", onednn_gflops="2",
                  blas_into_rows_gflops="1", onednn_into_rows_gflops="2", avx2_gflops="3",
                  avx2_into_rows_gflops="3", shape="s")
    fields.update(changes)
    return (HEADER + "\n" + "".join(f"{k}={v}\n" for k, v in fields.items() if v is not None)).encode()


@pytest.mark.parametrize("content", [
    b"",
    b"\x00\xff garbage \x89PNG\r\n",
    HEADER.encode() + b"\nmachine=",
    _record(gemm="fastest"),
    _record(blas_gflops="nan"),
    _record(onednn_into_rows_gflops="-1"),
    _record(avx2_gflops="inf"),
    _record(avx2_into_rows_gflops=None),
    _record(gemm="avx2", avx2_gflops="0"),  # a choice whose rate was never measured
    _record(gemm_into_rows=None),
    _record(shape="s\nno equals sign"),
    b"sdml_ext cpu gemm calibration v0\nmachine=x\n",
])
def test_bad_cache_file_is_ignored_and_rewritten(tmp_path, content):
    _cache_file(tmp_path).parent.mkdir(parents=True)
    _cache_file(tmp_path).write_bytes(content)
    choice = _choice(tmp_path)
    assert choice["how"] == "measured" and choice["cache"].startswith("ignored: ")
    assert choice["cache"].endswith("; written")
    assert _choice(tmp_path)["how"] == "cached"


def test_foreign_cache_file_is_ignored(tmp_path):
    first = _choice(tmp_path)
    path = _cache_file(tmp_path)
    # The same file from another machine (or torch, or thread count): its key differs.
    path.write_text(path.read_text().replace("machine=", "machine=another CPU;"))
    again = _choice(tmp_path)
    assert again["how"] == "measured"
    assert again["cache"] == "ignored: written for another machine, torch or thread count; written"
    assert again["machine"] == first["machine"]
    # A different thread count is another machine too.
    proc = _run(tmp_path, {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    one = json.loads(proc.stdout.strip().splitlines()[-1])
    if first["threads"] != 1:
        assert one["how"] == "measured" and one["threads"] == 1 and "threads=1" in one["machine"]


def test_unwritable_cache_dir_still_works(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the directory should be")
    choice = _choice(tmp_path)
    assert choice["how"] == "measured" and "not written" in choice["cache"]


@pytest.mark.parametrize("value", ["blas", "onednn", "avx2"])
def test_override(tmp_path, value):
    choice = _choice(tmp_path, SDML_CPU_GEMM=value)
    assert choice["how"].startswith(f"SDML_CPU_GEMM={value}")
    fallback = "no oneDNN" in choice["how"] or "no AVX2 and FMA" in choice["how"]
    assert choice["gemm"] == choice["gemm_into_rows"] and (choice["gemm"] == value) != fallback
    if value == "avx2":
        assert (choice["gemm"] == "avx2") == _has_avx2_fma()
    assert "measured_gflops" not in choice and choice["cache"] == "not used"
    assert not _cache_file(tmp_path).exists()


def test_measure_ignores_the_cache(tmp_path):
    _choice(tmp_path)
    again = _choice(tmp_path, SDML_CPU_GEMM="measure")
    assert again["how"] == "measured" and again["cache"] == "written"


def test_cache_off(tmp_path):
    choice = _choice(tmp_path, SDML_CACHE_DIR="off")
    assert choice["how"] == "measured" and choice["cache_file"] is None and choice["cache"] == "off"


def test_bad_override_names_the_variable(tmp_path):
    proc = _run(tmp_path, {"SDML_CPU_GEMM": "fastest"})
    assert proc.returncode != 0
    assert 'SDML_CPU_GEMM must be auto, measure, blas, onednn or avx2, got "fastest"' in proc.stderr
    info = _run(tmp_path, {"SDML_CPU_GEMM": "fastest"}, args=["-m", "sdml_ext.info"])
    assert info.returncode == 2 and info.stderr.startswith("python -m sdml_ext.info: SDML_CPU_GEMM must be")
    assert "Traceback" not in info.stderr


def test_info_command(tmp_path):
    proc = _run(tmp_path, {}, args=["-m", "sdml_ext.info"])
    assert proc.returncode == 0, proc.stderr
    assert "cpu_gemm:" in proc.stdout and "  gemm: " in proc.stdout and "  how: measured" in proc.stdout
    as_json = _run(tmp_path, {}, args=["-m", "sdml_ext.info", "--json"])
    info = json.loads(as_json.stdout)
    assert info["cpu_gemm"]["how"] == "cached" and "torch_version" in info
