"""The installed extension: what it was built with, and a clear error for a foreign torch."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
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


REPO = Path(__file__).resolve().parents[1]
# The session imports either the source tree, built in place (scripts/setup.sh: pip install -e),
# or an installed copy (pip install . and python -P, as on the GPU host).
IN_PLACE = Path(sdml_ext.__file__).resolve().parent == REPO / "sdml_ext"


def _python(args, cwd, *, isolated=False):
    flags = ["-P"] if isolated else []
    return subprocess.run([sys.executable, *flags, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_foreign_torch_is_refused_with_rebuild_advice(tmp_path):
    code = "import torch; torch.__version__ = '0.0.1'; import sdml_ext"
    proc = _python(["-c", code], tmp_path)
    assert proc.returncode != 0
    last = _last_line(proc)
    assert last.startswith("ImportError: sdml_ext in ") and "was built against torch" in last
    assert "but torch 0.0.1 is installed" in last and "--no-build-isolation" in last
    # The advice fits where the package came from: rebuild the checkout in place, or reinstall.
    assert ("Build it in place" in last and " -e " in last) if IN_PLACE else ("--force-reinstall" in last)


def _checkout_built() -> bool:
    """Whether the checkout's sdml_ext/ holds an extension built in place for this torch."""
    config = REPO / "sdml_ext" / "_build_config.py"
    built_for = re.search(r'^TORCH_VERSION = "(.*)"$', config.read_text(), re.M) if config.is_file() else None
    return bool(built_for and built_for.group(1) == torch.__version__ and list((REPO / "sdml_ext").glob("_C*.so")))


@pytest.mark.parametrize("module", ["sdml_ext.train", "sdml_ext.evaluate"])
@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_readme_commands_run_from_anywhere(module, where, tmp_path):
    """`python -m sdml_ext.train` as the README writes it. From the root the checkout itself is
    imported: it works once built in place (scripts/setup.sh), and otherwise says how to build
    it. From elsewhere the session's own sdml_ext is found (the checkout when installed
    editable, else the installed copy)."""
    at_root = where == "repository root"
    cwd = REPO if at_root else tmp_path
    proc = _python(["-m", module, "--help"], cwd)
    if at_root and not _checkout_built():
        assert proc.returncode != 0
        assert "is imported from the source tree" in _last_line(proc) and " -e " in _last_line(proc)
        return
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m {module}")
    where_from = _python(["-c", "import sdml_ext; print(sdml_ext.__file__)"], cwd)
    assert where_from.returncode == 0, where_from.stderr
    expected = REPO / "sdml_ext" / "__init__.py" if at_root else Path(sdml_ext.__file__)
    assert Path(where_from.stdout.strip()).resolve() == expected.resolve()
    if at_root or IN_PLACE:  # scripts/setup.sh's editable install: the checkout, from anywhere
        assert _checkout_built()


def _copy_package(dest: Path, *, checkout: bool, build_config: str | None = None) -> Path:
    """A copy of sdml_ext's Python sources under dest (no compiled extension), inside a fake
    checkout (pyproject.toml + CMakeLists.txt beside it) or as a bare installed-like package."""
    shutil.copytree(REPO / "sdml_ext", dest / "sdml_ext",
                    ignore=shutil.ignore_patterns("*.so", "_build_config.py", "__pycache__", "*.npz"))
    if checkout:
        for name in ("pyproject.toml", "CMakeLists.txt"):
            shutil.copy(REPO / name, dest / name)
    if build_config is not None:
        (dest / "sdml_ext" / "_build_config.py").write_text(
            f'TORCH_VERSION = "{build_config}"\nTORCH_CUDA_VERSION = ""\nWITH_CUDA = False\nCUDA_ARCHS = ""\n')
    return dest


@pytest.mark.parametrize("case", ["checkout never built", "checkout built for another torch",
                                  "checkout without _C", "installed copy without _build_config"])
def test_missing_or_foreign_extension_advice(case, tmp_path):
    checkout = case.startswith("checkout")
    build_config = {"checkout built for another torch": "0.0.1", "checkout without _C": torch.__version__}.get(case)
    root = _copy_package(tmp_path, checkout=checkout, build_config=build_config)
    # The copy comes first on sys.path; an editable install's import hook would still find the
    # real checkout, so it is taken out of this interpreter.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__name__.startswith('ScikitBuild')]; "
            "import sdml_ext")
    proc = _python(["-c", code], root)
    assert proc.returncode != 0
    last = _last_line(proc)
    assert last.startswith("ImportError: ") and str(root / "sdml_ext") in last
    if checkout:
        assert f"is imported from the source tree {root}" in last
        assert "scripts/setup.sh" in last and f"--no-build-isolation -e {root}" in last
        assert "run from another directory" in last  # the checkout is imported as the current directory
    else:
        assert "Reinstall sdml_ext against the installed torch" in last and "--force-reinstall" in last
    expected = {
        "checkout never built": "compiled extension is missing",
        "checkout built for another torch": "was built against torch 0.0.1",
        "checkout without _C": "does not load",
        "installed copy without _build_config": "compiled extension is missing",
    }[case]
    assert expected in last


def test_one_version_source():
    """The version is written once, in sdml_ext/__init__.py; the package metadata reads it."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert importlib.metadata.version("sdml_ext") == sdml_ext.__version__
