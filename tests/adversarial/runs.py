"""Run folders and bundles to tamper with: one small run stopped after its first modality
(in-process: the pause point raises KeyboardInterrupt, as Ctrl-C would), a finished
two-modality bundle, a copier that gives each test its own copy of them, a search index of that
bundle, and a small file system (tmpfs) to fill up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load, save

from helpers import run_config, run_main
from sdml_ext.cli import search as search_cli
from sdml_ext.cli import train as train_cli
from sdml_ext.data import load_dataset, save_npz
from sdml_ext.engine import checkpoint as checkpoint_module

SYNTHETIC = {"n_train": 150, "n_val": 50, "n_test": 60, "n_classes": 5, "n_modalities": 3}
SMALL = run_config(strategy="serial", epochs=6, hidden=[32, 32], code_dim=16, lr=[1e-3], batch_size=50)


def stop_at(event: str):
    """A pause point that stops the run (KeyboardInterrupt) when it reaches `event`."""
    def pause_point(name: str) -> None:
        if name == event:
            raise KeyboardInterrupt
    return pause_point


def train(argv, capsys, stop: str | None = None):
    """(exit status, stdout, stderr) of ``python -m sdml_ext.train argv`` run in this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDML_CHECKPOINT_EVERY", "0")
        if stop is not None:
            mp.setattr(checkpoint_module, "pause_point", stop_at(stop))
        return run_main(train_cli.main, argv, capsys)


def write_data(path: Path, perturb: bool = False) -> Path:
    dataset = load_dataset("synthetic", **SYNTHETIC)
    if perturb:  # same shapes, other values
        for modality in dataset.modalities:
            modality.train.features[0, 0] += 1.0
    save_npz(dataset, path)
    return path


@pytest.fixture(scope="session")
def originals(tmp_path_factory):
    """A directory holding small.toml, good3.npz, a run `ck` stopped after modality m1's epoch 3
    (started there with the relative --out ck) and a finished bundle `B` of m0 and m1."""
    base = tmp_path_factory.mktemp("adversarial")
    (base / "small.toml").write_text(SMALL)
    write_data(base / "good3.npz")
    capsys = _NullCapture()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        code, _, err = train(["--config", "small.toml", "--data", "good3.npz", "--out", "ck"], capsys, stop="epoch:m1:3")
        assert code == 130, err
        code, _, err = train(["--config", "small.toml", "--data", "good3.npz", "--modalities", "m0,m1", "--out", "B"], capsys)
        assert code == 0, err
    assert (base / "ck.partial" / "checkpoints" / "ckpt-01.safetensors").exists() and (base / "B" / "manifest.json").exists()
    return base


def search(argv, capsys):
    """(exit status, stdout, stderr) of ``python -m sdml_ext.search argv`` run in this process."""
    return run_main(search_cli.main, argv, capsys)


@pytest.fixture
def index(work, capsys):
    """An index `idx` of bundle B's m0 gallery (test split of good3.npz) with string ids, 2 shards."""
    (work / "ids.txt").write_text("".join(f"item-{i}\n" for i in range(60)))
    code, _, err = search(["build", "B", "--modality", "m0", "--features", "good3.npz", "--ids", "ids.txt",
                           "--shard-rows", "32", "--out", "idx"], capsys)
    assert code == 0, err
    return work / "idx"


class _NullCapture:
    def readouterr(self):
        return "", ""


@pytest.fixture
def work(originals, tmp_path, monkeypatch):
    """A private copy of `originals` (links kept as links), the current directory."""
    for entry in originals.iterdir():
        target = tmp_path / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def disk(work):
    """A 4 MiB tmpfs of 256 inodes at work/disk (small.toml and good3.npz stay outside it)."""
    mount = work / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M,nr_inodes=256", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path) -> Path:
    """Fill the file system at `mount` to the last byte."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def use_up_inodes(mount: Path) -> Path:
    """Create empty files under mount/inodes until the file system has no inode left (bytes
    remain: a file can no longer be created, one that exists can still grow)."""
    folder = mount / "inodes"
    folder.mkdir()
    try:
        for n in range(1 << 20):
            (folder / str(n)).touch()
    except OSError:
        pass
    return folder


def checkpoint_parts(path: Path) -> tuple[dict, dict]:
    """(tensors, header record) of a checkpoint file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    return load(data), json.loads(meta["sdml"])


def write_checkpoint(path: Path, tensors: dict, header: dict, fix_checksum: bool = True) -> None:
    """Rewrite a checkpoint, as an attacker would: with its checksum recomputed (or not)."""
    from sdml_ext.engine.checkpoint_checks import tensors_sha256

    if fix_checksum:
        header = {**header, "tensors_sha256": tensors_sha256(tensors)}
    path.write_bytes(save(tensors, metadata={"sdml": json.dumps(header)}))


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def bundle_arrays(path: Path) -> dict:
    from safetensors.numpy import load_file

    manifest = json.loads((path / "manifest.json").read_text())
    return {m["name"]: load_file(str(path / m["file"])) for m in manifest["modalities"]}


def same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in ((a[n], b[n]) for n in a)
    )
