"""A full disk gives one line naming the file, leaves nothing half-written, and leaves no run
folder that a rerun would refuse; so do the search tools' writers (an index, a faiss export, a
results file). The disk is a small tmpfs (the tests need to be root to mount one, as in CI
containers) filled up at a chosen moment of the run."""

import os
import shutil
from pathlib import Path

import pytest

from runs import bundle_arrays, fill, one_error_line, search, train, use_up_inodes
from sdml_ext.search import writer as writer_module
from sdml_ext.engine import checkpoint as checkpoint_module


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


# ---- the search tools' writers ------------------------------------------------------------------


def only_the_filler_is_left(mount: Path) -> bool:
    return sorted(p.name for p in mount.iterdir()) == ["filler"]


BUILD = ["build", "B", "--modality", "m0", "--features", "good3.npz", "--shard-rows", "32"]


def test_search_build_on_a_full_disk_names_the_index_and_leaves_nothing(work, disk, capsys):
    fill(disk)
    code, _, err = search([*BUILD, "--out", str(disk / "idx")], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and f"{disk / 'idx'}/shard-00000.safetensors" in line
    assert only_the_filler_is_left(disk)


def after_first_call(function, mount: Path):
    """`function`, filling the disk at `mount` once it has run for the first time."""
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        if not (mount / "filler").exists():
            fill(mount)
        return result
    return wrapped


def test_search_build_whose_disk_fills_after_a_shard_leaves_nothing(work, disk, capsys, monkeypatch):
    monkeypatch.setattr(writer_module, "publish", after_first_call(writer_module.publish, disk))
    code, _, err = search([*BUILD, "--out", str(disk / "idx")], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and f"{disk / 'idx'}/shard-00001.safetensors" in line
    assert only_the_filler_is_left(disk)


def test_search_build_whose_disk_fills_before_index_json_leaves_nothing(work, disk, capsys, monkeypatch):
    def write_json(*args, **kwargs):
        fill(disk)
        return real(*args, **kwargs)

    real = writer_module.write_json
    monkeypatch.setattr(writer_module, "write_json", write_json)
    code, _, err = search([*BUILD, "--out", str(disk / "idx")], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and str(disk / "idx" / "index.json") in line
    assert only_the_filler_is_left(disk)


@pytest.mark.parametrize("name", ["hits.csv", "hits.json"])
def test_search_query_out_on_a_full_disk_names_the_file_and_leaves_nothing(index, disk, capsys, name):
    fill(disk)
    code, _, err = search(["query", "idx", "--modality", "m1", "--features", "good3.npz", "--out", str(disk / name)],
                          capsys)
    line = one_error_line(err)
    assert code == 2 and line == f"error: cannot write {disk / name}: No space left on device"
    assert only_the_filler_is_left(disk)


def test_search_export_faiss_on_a_full_disk_names_the_file_and_leaves_nothing(index, disk, capsys):
    pytest.importorskip("faiss", reason="faiss is optional (pip install faiss-cpu)")
    fill(disk)
    code, _, err = search(["export-faiss", "idx", "--out", str(disk / "f.faiss")], capsys)
    line = one_error_line(err)
    assert code == 2 and line == f"error: cannot write {disk / 'f.faiss'}: No space left on device"
    assert only_the_filler_is_left(disk)


@pytest.mark.parametrize("command", ["build", "query", "export-faiss"])
def test_search_writers_on_a_disk_without_inodes_name_the_output(index, disk, capsys, command):
    """No file can be created at all: the temporary file or folder fails first, and the line
    names the output the user asked for, not the temporary name."""
    if command == "export-faiss":
        pytest.importorskip("faiss", reason="faiss is optional (pip install faiss-cpu)")
    use_up_inodes(disk)
    out = disk / {"build": "idx", "query": "hits.csv", "export-faiss": "f.faiss"}[command]
    argv = {"build": [*BUILD, "--out", str(out)],
            "query": ["query", "idx", "--modality", "m1", "--features", "good3.npz", "--out", str(out)],
            "export-faiss": ["export-faiss", "idx", "--out", str(out)]}[command]
    code, _, err = search(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and str(out) in line and ".tmp" not in line
    assert sorted(p.name for p in disk.iterdir()) == ["inodes"]
