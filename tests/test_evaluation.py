"""python -m sdml_ext.evaluate and sdml_ext.eval: evaluating a bundle on another file, split or
dataset, its errors, the precision scope and the curve figures."""

import json

import pytest

from helpers import config_file, run_main  # noqa: F401  (config_file: a fixture)

from sdml_ext import evaluate, train


def test_evaluate_overrides_dataset_data_and_split(tmp_path, config_file, capsys):
    from sdml_ext.data import load_dataset, save_npz

    out = tmp_path / "b"
    argv = ["--dataset", "synthetic", "--modalities", "m0,m1", "--config", config_file, "--epochs", "2", "--out", str(out)]
    assert run_main(train.main, argv, capsys)[0] == 0
    recorded = json.loads((out / "manifest.json").read_text())["metrics"]["test"]
    # The same data, moved to a file of another kind: the same tables.
    options = json.loads((out / "manifest.json").read_text())["config"]["dataset_options"]
    save_npz(load_dataset("synthetic", **options), tmp_path / "moved.npz")
    for split, rows in (("test", 60), ("val", 50)):
        argv = [str(out), "--dataset", "npz", "--data", str(tmp_path / "moved.npz"), "--split", split,
                "--out", str(tmp_path / split)]
        assert run_main(evaluate.main, argv, capsys)[0] == 0
        metrics = json.loads((tmp_path / split / "metrics.json").read_text())
        assert metrics["split"] == split and metrics["queries"] == {"m0": rows, "m1": rows}
    test = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert test["map_all"]["table"] == recorded["map_all"]["table"]
    assert json.loads((tmp_path / "val" / "metrics.json").read_text())["map_all"]["table"] != recorded["map_all"]["table"]
    code, _, err = run_main(evaluate.main, [str(out), "--dataset", "npz", "--data", str(tmp_path / "absent.npz")], capsys)
    assert code == 2 and "absent.npz" in err


def test_evaluate_user_errors(tmp_path, capsys):
    code, _, err = run_main(evaluate.main, [str(tmp_path / "absent")], capsys)
    assert code == 2 and "bundle not found" in err


def test_precision_scope():
    from sdml_ext.eval.evaluation import precision_scope

    for n in (1, 5, 400, 23661):
        ks = precision_scope(n)
        assert ks[0] == 1 and ks[-1] == n and ks == sorted(set(ks))  # K from 1 up to the whole gallery
        assert [k for k in range(100, 1001, 100) if k <= n] == [k for k in ks if k >= 100 and k % 100 == 0 and k <= 1000]
    assert precision_scope(5) == [1, 2, 3, 4, 5]
    assert 20 <= len(precision_scope(400)) <= 30
    with pytest.raises(ValueError, match="gallery_size"):
        precision_scope(0)


def test_curve_figures_one_panel_per_query_titled_and_distinguishable():
    import torch
    from sdml_ext.eval.plots import draw_curves
    from sdml_ext.eval.metrics import PairCurves

    names = ["fac", "fou", "kar", "mor", "pix", "zer"]
    x = torch.tensor([1.0, 10.0, 100.0, 400.0], dtype=torch.float64)
    pk = PairCurves(x, {(q, g): torch.linspace(1, 0.1, 4, dtype=torch.float64) for q in names for g in names if q != g})
    fig = draw_curves(pk, "pk", "mfeat", "test")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"query: {q}" for q in names]
    assert "mfeat" in fig._suptitle.get_text() and "test split" in fig._suptitle.get_text()
    for ax, query in zip(panels, names):
        lines = ax.get_lines()
        assert sorted(ln.get_label() for ln in lines) == sorted(n for n in names if n != query)
        assert ax.get_xscale() == "log" and ax.get_xlim()[0] == 1
    styles = {}
    for ax in panels:
        for ln in ax.get_lines():
            styles.setdefault(ln.get_label(), set()).add((ln.get_color(), ln.get_marker(), ln.get_linestyle()))
    assert all(len(s) == 1 for s in styles.values())  # a gallery modality looks the same in every panel
    every = [next(iter(s)) for s in styles.values()]
    for part in range(3):  # colour, marker and line style each tell the six galleries apart... or nearly
        assert len({style[part] for style in every}) >= min(len(every), 4)
    assert len(set(every)) == len(every)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == names and legend.get_texts()[0].get_fontsize() >= 9

    pr = PairCurves(torch.linspace(0, 1, 11, dtype=torch.float64),
                    {("img", "txt"): torch.ones(11, dtype=torch.float64), ("txt", "img"): torch.ones(11, dtype=torch.float64)})
    fig = draw_curves(pr, "pr", "wikipedia", "val")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2 and "wikipedia, val split" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="kind"):
        draw_curves(pr, "roc", "x", "test")
