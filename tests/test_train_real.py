"""Training on a real multi-view set from the shared fixtures (MSRC-v1: 5 image descriptors,
7 classes, 210 images), evaluated with the paper's metric; skipped without SDML_SHARED_DATA."""

import os

import pytest
import torch

from sdml_ext.store.bundle import load, save_bundle
from sdml_ext.data import load_dataset
from sdml_ext.eval.evaluation import encode_split, evaluate
from sdml_ext.model import make_projection
from sdml_ext.engine.strategies import train_tasks
from sdml_ext.engine.training import TrainOptions, make_tasks


@pytest.fixture(scope="module")
def msrc():
    root = os.environ.get("SDML_SHARED_DATA")
    if not root or not os.path.isdir(root):
        pytest.skip("SDML_SHARED_DATA not set: point it at the shared fixture folder (holding msrc_v1/) to run this test")
    return load_dataset("multiview-mat", os.path.join(root, "msrc_v1", "MSRC_v1.mat"))


@pytest.fixture
def one_thread():
    # Networks this small gain nothing from a second thread, and on a loaded machine spinning
    # OpenMP threads made this test 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_msrc_v1_learns_a_common_space(msrc, tmp_path, one_thread):
    opts = TrainOptions(epochs=30, batch_size=42, hidden=(128, 128), code_dim=64, lr=(1e-3,))
    P = make_projection(64, msrc.num_classes, 0)
    report = train_tasks(make_tasks(msrc, P, opts), "serial")
    path = save_bundle(tmp_path / "msrc", P=P, projection_seed=0, results=report.modalities,
                       class_names=msrc.class_names, dataset={"name": msrc.name}, config={}, run=report.summary())
    result = evaluate(encode_split(load(path), msrc))
    # 7 balanced classes: a random space scores about 0.2; a learnt one far more.
    assert result.map_all.average > 0.45, result.format()
