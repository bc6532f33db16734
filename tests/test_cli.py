"""python -m sdml_ext.train / sdml_ext.evaluate: end to end on small synthetic data, adding a
modality, and bad input (one clear line, exit status 2, no traceback)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import CONFIG, config_file, run_main  # noqa: F401  (config_file: a fixture)

import sdml_ext
from sdml_ext import evaluate, train


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data", "--strategy", "--epochs", "--batch-size", "--lam", "--lr", "--seed", "--out",
                 "--devices", "--config", "--add-modality", "--into", "--modalities", "--code-dim", "--preprocess"):
        assert flag in text


def test_train_add_modality_and_evaluate(tmp_path, config_file, capsys):
    out = tmp_path / "bundle"
    code, stdout, _ = run_main(train.main, ["--dataset", "synthetic", "--modalities", "m0,m1", "--config", config_file,
                                            "--epochs", "3", "--out", str(out)], capsys)
    assert code == 0
    assert "mAP@all" in stdout and "average over 2 pairs" in stdout and "whole run (serial)" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["epochs"] == 3 and manifest["config"]["hidden"] == [64, 64]  # flag over file
    assert manifest["config"]["dataset_options"]["n_classes"] == 5
    assert manifest["metrics"]["test"]["map_all"]["average"] > 0.3  # chance is ~0.2
    old = {f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith(".safetensors")}

    code, stdout, _ = run_main(train.main, ["--add-modality", "m2", "--into", str(out)], capsys)
    assert code == 0 and "average over 6 pairs" in stdout
    assert {f: (out / f).read_bytes() for f in old} == old  # existing networks untouched, bit for bit
    b = sdml_ext.load(out)
    assert b.modality_names == ["m0", "m1", "m2"] and b.input_dim("m2") == 32
    test = json.loads((out / "manifest.json").read_text())["metrics"]["test"]
    table, new = test["map_all"], test["modalities"].index("m2")
    # The new modality retrieves from and into the old ones, well above chance (~0.2).
    assert min(table["table"][new][g] for g in range(3) if g != new) > 0.3
    assert min(table["table"][q][new] for q in range(3) if q != new) > 0.3

    code, stdout, _ = run_main(evaluate.main, [str(out), "--out", str(tmp_path / "eval")], capsys)
    assert code == 0 and "mAP@50" in stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["modalities"] == ["m0", "m1", "m2"] and metrics["precision_at_k"]["k"][::len(metrics["precision_at_k"]["k"]) - 1] == [1, 60]
    assert len(metrics["precision_at_k"]["m2->m0"]) == len(metrics["precision_at_k"]["k"]) and len(metrics["precision_recall"]["recall"]) == 11
    for png in ("precision_recall.png", "precision_at_k.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:4] == b"\x89PNG"

    # Never overwrite a finished bundle.
    code, _, err = run_main(train.main, ["--dataset", "synthetic", "--config", config_file, "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err
    assert {f: (out / f).read_bytes() for f in old} == old


def test_add_modality_with_other_classes_is_refused(tmp_path, config_file, capsys):
    out = tmp_path / "b"
    assert run_main(train.main, ["--dataset", "synthetic", "--modalities", "m0,m1", "--config", config_file,
                                 "--epochs", "1", "--out", str(out)], capsys)[0] == 0
    other = tmp_path / "other.toml"
    other.write_text(CONFIG.replace("n_classes = 5", "n_classes = 6"))
    code, _, err = run_main(train.main, ["--add-modality", "m2", "--into", str(out), "--config", str(other)], capsys)
    assert code == 2 and "6 classes" in err and "5 classes" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "xmedia", "--data", "/nonexistent/x.mat"], "not found"),
        (["--dataset", "synthetic", "--code-dim", "4"], "exceeds the code width"),
        (["--dataset", "synthetic", "--out", "/proc/sdml-cannot-write-here"], "cannot write the output"),
        (["--dataset", "synthetic", "--modalities", "m0,text"], "no modality 'text'"),
        (["--dataset", "synthetic", "--modalities", "m0,m0"], "listed twice"),
        (["--dataset", "synthetic", "--batch-size", "1000"], "fewer than the batch size"),
        (["--config", "/nonexistent.toml"], "config file not found"),
        (["--add-modality", "m9"], "go together"),
        (["--add-modality", "m9", "--into", "/nonexistent-bundle"], "bundle not found"),
        (["--add-modality", "m9", "--into", "/nonexistent-bundle", "--out", "x"], "--out does not go with --add-modality"),
        (["--dataset", "synthetic", "--devices", "foo"], "devices: 'foo' is not a device"),
        (["--dataset", "synthetic", "--devices", "cuda:x"], "devices: 'cuda:x' is not a device"),
        (["--dataset", "synthetic", "--devices", "cpu,cuda:0"], "devices must be cpu, auto, or one or more CUDA"),
        (["--dataset", "synthetic", "--devices", "cuda:0,cuda:0"], "lists a device twice"),
    ],
)
def test_user_errors_are_one_clear_line(argv, message, capsys, config_file, tmp_path):
    argv = [*argv, "--config", config_file] if "--config" not in argv else argv
    if "--out" not in argv and "--into" not in argv:
        argv += ["--out", str(tmp_path / "never")]
    code, _, err = run_main(train.main, argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ('devices = ["cuda:x"]', "devices: 'cuda:x' is not a device"),
        ('devices = "cpu"', "setting 'devices' must be list[str]"),
        ('[dataset_options]\nn_train = 150\nbogus = 1', "dataset 'synthetic': unknown dataset option(s) ['bogus']; valid: n_modalities"),
    ],
)
def test_config_file_errors_are_one_clear_line(text, message, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(f'dataset = "synthetic"\n{text}\n')
    code, _, err = run_main(train.main, ["--config", str(config), "--out", str(tmp_path / "never")], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_a_binary_config_file_is_named(tmp_path, capsys):
    config = tmp_path / "model.bin"
    config.write_bytes(bytes(range(256)))
    code, _, err = run_main(train.main, ["--config", str(config)], capsys)
    assert code == 2 and f"config file {config} is not valid TOML" in err and "Traceback" not in err


def test_an_out_setting_in_the_config_file_is_refused_with_add_modality(tmp_path, capsys):
    config = tmp_path / "add.toml"
    config.write_text('out = "elsewhere"\n')
    argv = ["--add-modality", "m9", "--into", str(tmp_path / "bundle"), "--config", str(config)]
    code, _, err = run_main(train.main, argv, capsys)
    assert code == 2 and f"out (in {config}) does not go with --add-modality" in err and "Traceback" not in err


def test_a_failed_run_removes_the_directories_it_created_only(tmp_path, config_file, capsys):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("not the run's")
    for out, gone, kept in ((tmp_path / "a" / "b" / "bundle", tmp_path / "a", tmp_path),
                            (tmp_path / "kept" / "c" / "bundle", tmp_path / "kept" / "c", tmp_path / "kept" / "mine.txt")):
        # Fails after the output was checked (its parents created): too few rows for the batch.
        argv = ["--dataset", "synthetic", "--config", config_file, "--batch-size", "1000", "--out", str(out)]
        code, _, err = run_main(train.main, argv, capsys)
        assert code == 2 and "fewer than the batch size" in err
        assert not gone.exists() and kept.exists()


def test_the_manifest_is_written_once_per_run(tmp_path, config_file, capsys, monkeypatch):
    from sdml_ext.store import bundle as bundle_mod

    writes = []
    for name in ("write_json", "write_json_atomic"):  # the new bundle's manifest, an added modality's
        real = getattr(bundle_mod, name)
        monkeypatch.setattr(bundle_mod, name, lambda path, data, real=real: (writes.append(path), real(path, data)))
    out = tmp_path / "b"
    argv = ["--dataset", "synthetic", "--modalities", "m0,m1", "--config", config_file, "--epochs", "1", "--out", str(out)]
    assert run_main(train.main, argv, capsys)[0] == 0
    assert len(writes) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["modalities"] == ["m0", "m1"]
    assert "config" not in manifest["runs"][0]  # stored once, at the top
    assert run_main(train.main, ["--add-modality", "m2", "--into", str(out)], capsys)[0] == 0
    assert len(writes) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["modalities"] == ["m0", "m1", "m2"]
    assert manifest["runs"][1]["config"]["modalities"] == ["m2"]  # what the add ran with


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    # cwd outside the repository: -m must find the installed package, not the source tree.
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    proc = run("sdml_ext.train", "--dataset", "nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("sdml_ext.evaluate", str(tmp_path))
    assert proc.returncode == 2 and "not an SDML bundle" in proc.stderr and "Traceback" not in proc.stderr


def test_a_single_modality_trains_and_skips_the_table(tmp_path, config_file, capsys):
    out = tmp_path / "one"
    code, stdout, _ = run_main(train.main, ["--dataset", "synthetic", "--modalities", "m1", "--config", config_file,
                                            "--epochs", "1", "--out", str(out)], capsys)
    assert code == 0 and "no cross-modal table yet" in stdout
    assert sdml_ext.load(out).modality_names == ["m1"]


def test_data_path_alone_detects_the_layout_and_is_stored_absolute(tmp_path, monkeypatch, capsys):
    """`--data FILE` without --dataset; the relative path typed then still works from elsewhere."""
    from sdml_ext.data import make_synthetic, save_npz

    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_dir.mkdir(), elsewhere.mkdir()
    save_npz(make_synthetic(n_classes=5, n_train=150, n_val=50, n_test=60), data_dir / "set.npz")
    settings = tmp_path / "small.toml"
    settings.write_text(CONFIG.split("[dataset_options]")[0])
    monkeypatch.chdir(data_dir)
    code, stdout, err = run_main(train.main, ["--data", "set.npz", "--modalities", "m0,m1", "--config", str(settings),
                                              "--epochs", "1", "--out", "../bundle"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["config"]["dataset"] == "npz"
    assert manifest["config"]["data"] == str(data_dir / "set.npz")

    monkeypatch.chdir(elsewhere)
    code, stdout, err = run_main(evaluate.main, ["../bundle"], capsys)
    assert code == 0 and "mAP@all" in stdout, err
    code, stdout, err = run_main(train.main, ["--add-modality", "m2", "--into", "../bundle"], capsys)
    assert code == 0 and "average over 6 pairs" in stdout, err


def test_data_path_of_unknown_layout_is_one_clear_line(tmp_path, capsys):
    import scipy.io

    path = tmp_path / "mystery.mat"
    scipy.io.savemat(path, {"features": [[1.0, 2.0]], "labels": [0]})
    code, _, err = run_main(train.main, ["--data", str(path), "--out", str(tmp_path / "never")], capsys)
    assert code == 2 and "cannot tell the dataset layout" in err and "XMedia" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_data_for_a_bundle_of_built_in_data_is_detected(tmp_path, capsys):
    """A bundle trained on the embedded digits, evaluated and extended with the same data read
    from a file: --data alone, no --dataset."""
    from sdml_ext.data import load_dataset, save_npz

    save_npz(load_dataset("mfeat"), tmp_path / "digits.npz")
    settings = tmp_path / "small.toml"
    settings.write_text(CONFIG.split("[dataset_options]")[0])
    out = tmp_path / "bundle"
    assert run_main(train.main, ["--modalities", "fou,kar", "--config", str(settings), "--epochs", "1",
                                 "--out", str(out)], capsys)[0] == 0
    code, stdout, err = run_main(evaluate.main, [str(out), "--data", str(tmp_path / "digits.npz")], capsys)
    assert code == 0 and "average over 2 pairs" in stdout, err
    code, stdout, err = run_main(train.main, ["--add-modality", "zer", "--into", str(out), "--data",
                                              str(tmp_path / "digits.npz")], capsys)
    assert code == 0 and "average over 6 pairs" in stdout, err
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["config"]["dataset"] == "npz"
