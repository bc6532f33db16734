"""The installed extension: what it was built with, and a clear error for a foreign torch."""

import shutil
import subprocess
import sys

import torch

import sdml_ext


def test_build_info_matches_this_torch():
    info = sdml_ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    if torch.version.cuda and shutil.which("nvcc"):
        # AUTO must compile the CUDA kernels here; the default arch is sm_90.
        assert info["cuda_kernels"] and "90" in info["cuda_archs"]
    if not torch.version.cuda:
        assert not info["cuda_kernels"] and info["cuda_archs"] == []


def test_cuda_kernels_registered_when_compiled():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("sdml::dsae_loss", "CUDA")
    assert has_cuda_kernel == sdml_ext.build_info()["cuda_kernels"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sdml::dsae_loss", "CPU")


def test_foreign_torch_is_refused_with_rebuild_advice(tmp_path):
    code = "import torch; torch.__version__ = '0.0.1'; import sdml_ext"
    # cwd away from the repo root, so the installed package is imported, not the source tree.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: sdml_ext was built against torch")
    assert "but torch 0.0.1 is installed" in last and "--no-build-isolation" in last
