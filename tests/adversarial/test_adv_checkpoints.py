"""A checkpoint is restored only after it is checked: tensors of the trainer's shapes and dtypes,
bytes matching their checksum, a record with every field in range, the data it was trained on;
and it is read without trusting its size or kind. Each failure is one line naming the field."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from runs import bundle_arrays, checkpoint_parts, one_error_line, same_arrays, train, write_checkpoint, write_data

CKPT = Path("ck.partial/checkpoints/ckpt-01.safetensors")


@pytest.fixture(autouse=True)
def no_hang():
    """A read that would block (a FIFO) fails the test instead of hanging it."""
    def hung(*_):
        raise TimeoutError("the resume blocked")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def resume_fails(capsys) -> str:
    code, _, err = train(["--resume", "ck.partial"], capsys)
    assert code == 2, err
    return one_error_line(err)


def test_an_adam_moment_of_the_wrong_shape_is_refused_naming_it(work, capsys):
    tensors, header = checkpoint_parts(work / CKPT)
    tensors["adam.0.exp_avg"] = torch.zeros(3)
    write_checkpoint(work / CKPT, tensors, header)
    line = resume_fails(capsys)
    assert "adam.0.exp_avg" in line and "(3,)" in line


@pytest.mark.parametrize("name,value", [
    ("model.encoder.0.weight", None),  # dropped
    ("rng.shuffle", None),
    ("best.encoder.0.bias", torch.zeros(5, dtype=torch.float64)),
    ("adam.1.step", torch.zeros(4)),
    ("surprise", torch.zeros(1)),
])
def test_a_missing_extra_or_misshapen_tensor_is_refused_naming_it(work, capsys, name, value):
    tensors, header = checkpoint_parts(work / CKPT)
    if value is None:
        key = next(k for k in tensors if k.startswith(name.split(".")[0] + "."))
        name = key if name not in tensors else name
        del tensors[name]
    else:
        if name.startswith("best."):
            name = next(k for k in tensors if k.startswith("best."))
        tensors[name] = value
    write_checkpoint(work / CKPT, tensors, header)
    assert repr(name) in resume_fails(capsys)


def test_a_flipped_bit_is_caught_by_the_checksum(work, capsys):
    data = bytearray((work / CKPT).read_bytes())
    data[-5] ^= 0x10
    (work / CKPT).write_bytes(bytes(data))
    assert "checksum" in resume_fails(capsys)


@pytest.mark.parametrize("field,value", [
    ("epoch", 10**9), ("epoch", -5), ("best_epoch", 99), ("busy_s", "soon"), ("history", "none"),
])
def test_an_out_of_range_record_is_refused_naming_the_field(work, capsys, field, value):
    tensors, header = checkpoint_parts(work / CKPT)
    header["trainer"][field] = value
    write_checkpoint(work / CKPT, tensors, header)
    assert f"trainer.{field}" in resume_fails(capsys)


def test_a_record_missing_a_field_is_refused_naming_it(work, capsys):
    tensors, header = checkpoint_parts(work / CKPT)
    del header["trainer"]["best_loss"]
    write_checkpoint(work / CKPT, tensors, header)
    assert "trainer.best_loss" in resume_fails(capsys)


def test_a_link_to_dev_zero_is_refused(work, capsys):
    (work / CKPT).unlink()
    (work / CKPT).symlink_to("/dev/zero")
    line = resume_fails(capsys)
    assert "regular file" in line or "symbolic link" in line


def test_a_fifo_is_refused_without_hanging(work, capsys):
    (work / CKPT).unlink()
    os.mkfifo(work / CKPT)
    assert "regular file" in resume_fails(capsys)


def test_a_huge_sparse_checkpoint_is_refused_before_it_is_read(work, capsys):
    os.truncate(work / CKPT, 1 << 40)
    line = resume_fails(capsys)
    assert "bytes" in line and "ckpt-01" in line


def test_a_header_declaring_more_than_the_file_is_refused(work, capsys):
    data = bytearray((work / CKPT).read_bytes())
    data[:8] = (1 << 50).to_bytes(8, "little")
    (work / CKPT).write_bytes(bytes(data))
    assert "header" in resume_fails(capsys)


def test_resuming_on_changed_data_of_the_same_shapes_is_refused(work, capsys):
    write_data(work / "good3.npz", perturb=True)
    record = json.loads((work / "ck.partial" / "run.json").read_text())
    record["config"]["data"] = str(work / "good3.npz")  # the run's data file (absolute), changed
    (work / "ck.partial" / "run.json").write_text(json.dumps(record))
    line = resume_fails(capsys)
    assert "other data" in line and "ckpt-00" in line


def test_the_checks_pass_on_an_untouched_run(work, capsys, originals):
    code, _, err = train(["--resume", "ck.partial"], capsys)
    assert code == 0, err
    code, _, err = train(["--config", "small.toml", "--data", "good3.npz", "--out", "fresh"], capsys)
    assert code == 0, err
    assert same_arrays(bundle_arrays(work / "ck"), bundle_arrays(work / "fresh"))
