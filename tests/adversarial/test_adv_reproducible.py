"""The same parallel CPU run twice gives the same models, bit for bit: every worker keeps one
thread count for the whole run, whenever the other workers finish."""

import numpy as np

from helpers import small_tasks
from sdml_ext.data import make_synthetic
from sdml_ext.engine.strategies import train_tasks


def test_two_parallel_runs_of_the_same_tasks_are_bitwise_equal():
    # Unequal modalities: one worker runs out of work while the other still trains, which is
    # when cores used to be handed on, at a moment that depends on timing.
    ds = make_synthetic(3, dims=[300, 12, 12], n_train=200, n_val=40, n_test=10, n_classes=4)
    runs = [train_tasks(small_tasks(ds, epochs=5, lr=(1e-3,)), "parallel", ["cpu"]) for _ in range(2)]
    for a, b in zip(*(r.modalities for r in runs)):
        assert a.best_epoch == b.best_epoch, a.name
        for key in a.state:
            assert np.array_equal(a.state[key], b.state[key]), f"{a.name} {key}"
