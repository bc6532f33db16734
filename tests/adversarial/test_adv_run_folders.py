"""A handed-over run folder or bundle cannot make the writers delete or overwrite anything
outside it, and a run folder resumes from any directory (its output is its sibling)."""

import json
import os
import tempfile
from pathlib import Path

from runs import bundle_arrays, one_error_line, train


def _edit_json(path: Path, **changes):
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def test_a_crafted_mp_tempdir_outside_the_temp_dir_is_never_removed(work, capsys):
    victim = work / "victim_dir"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    _edit_json(work / "ck.partial" / "owner-lock.json", pid=999999, mp_tempdir=str(victim))
    code, _, err = train(["--resume", "ck.partial"], capsys)
    assert code == 0, err
    assert (victim / "precious").read_text() == "keep me"
    assert (work / "ck" / "manifest.json").exists()


def test_a_crafted_mp_tempdir_in_the_temp_dir_not_named_pymp_is_never_removed(work, capsys):
    victim = Path(tempfile.mkdtemp(prefix="sdml-victim-"))
    try:
        _edit_json(work / "ck.partial" / "owner-lock.json", pid=999999, mp_tempdir=str(victim))
        code, _, err = train(["--resume", "ck.partial"], capsys)
        assert code == 0, err
        assert victim.is_dir()
    finally:
        victim.rmdir()


def test_a_crafted_output_in_run_json_is_ignored(work, capsys):
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".x.tmp-keep").mkdir()
    record = json.loads((work / "ck.partial" / "run.json").read_text())
    record["config"]["out"] = str(elsewhere / "x")
    (work / "ck.partial" / "run.json").write_text(json.dumps(record))
    code, _, err = train(["--resume", "ck.partial"], capsys)
    assert code == 0, err
    assert (elsewhere / ".x.tmp-keep").is_dir() and not (elsewhere / "x").exists()
    assert (work / "ck" / "manifest.json").exists()


def test_resume_from_another_directory_writes_next_to_the_run_folder(work, capsys, monkeypatch):
    other = work / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    code, _, err = train(["--resume", "../ck.partial"], capsys)
    assert code == 0, err
    assert (work / "ck" / "manifest.json").exists() and not (other / "ck").exists()


def test_a_stopped_add_modality_resumes_from_another_directory(work, capsys, monkeypatch):
    code, _, err = train(["--add-modality", "m2", "--into", "B"], capsys, stop="epoch:m2:2")
    assert code == 130, err
    other = work / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    code, _, err = train(["--resume", "../B.partial"], capsys)
    assert code == 0, err
    assert list(bundle_arrays(work / "B")) == ["m0", "m1", "m2"]


def test_a_symlinked_bundle_lock_is_refused_and_its_target_untouched(work, capsys):
    victim = work / "victim.txt"
    victim.write_text("precious")
    (work / "B" / ".lock").unlink(missing_ok=True)
    (work / "B" / ".lock").symlink_to(victim)
    code, _, err = train(["--add-modality", "m2", "--into", "B"], capsys)
    assert code == 2
    assert "symbolic link" in one_error_line(err) and ".lock" in err
    assert victim.read_text() == "precious"


def test_a_symlinked_run_lock_is_refused_and_its_target_untouched(work, capsys):
    victim = work / "victim.txt"
    victim.write_text("precious")
    (work / "ck.partial" / "lock").unlink(missing_ok=True)
    (work / "ck.partial" / "lock").symlink_to(victim)
    code, _, err = train(["--resume", "ck.partial"], capsys)
    assert code == 2
    assert "symbolic link" in one_error_line(err)
    assert victim.read_text() == "precious"


def test_a_symlinked_checkpoint_directory_is_refused(work, capsys):
    outside = work / "outside"
    (work / "ck.partial" / "checkpoints").rename(outside)
    (outside / ".keep.tmp-1").write_text("precious")
    (work / "ck.partial" / "checkpoints").symlink_to(outside)
    code, _, err = train(["--resume", "ck.partial"], capsys)
    assert code == 2
    assert "symbolic link" in one_error_line(err)
    assert (outside / ".keep.tmp-1").read_text() == "precious"


def test_a_symlinked_manifest_temporary_receives_nothing(work, capsys):
    victim = work / "victim.txt"
    victim.write_text("precious")
    (work / "B" / f".manifest.json.tmp-{os.getpid()}").symlink_to(victim)  # this process writes
    code, _, err = train(["--add-modality", "m2", "--into", "B"], capsys)
    assert code == 0, err
    assert victim.read_text() == "precious"
    assert not (work / "B" / "manifest.json").is_symlink()
    assert list(bundle_arrays(work / "B")) == ["m0", "m1", "m2"]


def test_a_run_record_missing_its_fields_is_one_line(work, capsys):
    (work / "ck.partial" / "run.json").write_text(json.dumps({"kind": "add-modality", "config": {}}))
    code, _, err = train(["--resume", "ck.partial"], capsys)
    assert code == 2 and "names" in one_error_line(err)


def test_an_empty_out_is_refused_not_replaced_by_the_default(work, capsys):
    code, _, err = train(["--config", "small.toml", "--data", "good3.npz", "--out", ""], capsys)
    assert code == 2 and "--out is empty" in one_error_line(err)
    assert not (work / "runs").exists()
