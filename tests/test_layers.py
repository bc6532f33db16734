"""The package's import graph follows its folders' layers (tools/check_layers.py): no cycles, no
import from a lower layer to a higher one."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_cycles_and_no_upward_imports():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 cycles, 0 upward imports" in proc.stdout


def test_the_check_catches_an_upward_import(tmp_path):
    # A copy of the package with one upward import (store -> engine): the check must fail.
    import shutil

    shutil.copytree(ROOT / "sdml_ext", tmp_path / "sdml_ext", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "check_layers.py", tmp_path / "tools")
    files = tmp_path / "sdml_ext" / "store" / "files.py"
    files.write_text(files.read_text() + "\nfrom ..engine import flows  # noqa\n")
    proc = subprocess.run([sys.executable, str(tmp_path / "tools" / "check_layers.py")], capture_output=True, text=True)
    assert proc.returncode == 1 and "upward import: sdml_ext.store.files (foundation) imports sdml_ext.engine.flows" in proc.stdout
    assert "import cycle" in proc.stdout  # engine imports the store, so this one closes a cycle too
