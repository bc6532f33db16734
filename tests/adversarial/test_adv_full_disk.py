"""A full disk gives one line naming the file, leaves nothing half-written, and leaves no run
folder that a rerun would refuse. The disk is a small tmpfs (the tests need to be root to mount
one, as in CI containers) filled up at a chosen moment of the run."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from runs import bundle_arrays, one_error_line, train
from sdml_ext.engine import checkpoint as checkpoint_module


@pytest.fixture
def disk(work):
    """A 4 MiB tmpfs at work/disk (small.toml and good3.npz stay outside it)."""
    mount = work / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], capture_output=True)
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


def fill_at(event: str, mount: Path):
    """A pause point that fills the disk when the run reaches `event`."""
    def pause_point(name: str) -> None:
        if name == event:
            fill(mount)
    return pause_point


def test_a_full_disk_at_the_final_bundle_write_is_one_line_and_resumable(work, disk, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "pause_point", fill_at("epoch:m2:6", disk))
    code, _, err = train(["--config", "small.toml", "--data", "good3.npz", "--out", str(disk / "r")], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and str(disk / "r") in line
    assert not (disk / "r").exists() and not list(disk.glob(".r.tmp-*"))  # nothing half-written
    monkeypatch.undo()
    (disk / "filler").unlink()
    code, _, err = train(["--resume", str(disk / "r.partial")], capsys)
    assert code == 0, err
    assert list(bundle_arrays(disk / "r")) == ["m0", "m1", "m2"]


def test_a_full_disk_when_run_json_is_written_leaves_no_stuck_run_folder(work, disk, capsys):
    filler = fill(disk)
    code, _, err = train(["--config", "small.toml", "--data", "good3.npz", "--out", str(disk / "r")], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and "run.json" in line
    assert not (disk / "r.partial").exists()
    filler.unlink()
    code, _, err = train(["--config", "small.toml", "--data", "good3.npz", "--out", str(disk / "r")], capsys)
    assert code == 0, err


def test_a_stuck_run_folder_without_its_record_does_not_block_a_rerun(work, capsys):
    (work / "r.partial").mkdir()  # what a run that failed writing run.json used to leave
    code, _, err = train(["--config", "small.toml", "--data", "good3.npz", "--out", "r", "--epochs", "1"], capsys)
    assert code == 0, err


def test_a_full_disk_during_add_modality_is_one_line_and_leaves_the_bundle_as_it_was(work, disk, capsys, monkeypatch):
    shutil.copytree(work / "B", disk / "B")
    before = bundle_arrays(disk / "B")
    manifest = (disk / "B" / "manifest.json").read_bytes()
    monkeypatch.setattr(checkpoint_module, "pause_point", fill_at("epoch:m2:6", disk))
    code, _, err = train(["--add-modality", "m2", "--into", str(disk / "B")], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and str(disk / "B") in line
    assert (disk / "B" / "manifest.json").read_bytes() == manifest
    assert bundle_arrays(disk / "B").keys() == before.keys()


def test_write_atomic_on_a_full_disk_names_the_file_and_leaves_no_temporary(disk):
    from sdml_ext.store.files import WriteFailed, write_atomic

    fill(disk)
    with pytest.raises(WriteFailed, match=f"cannot write {disk / 'x.json'}: No space left on device"):
        write_atomic(disk / "x.json", b"y" * 100000)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    assert not os.path.exists(disk / "x.json")
