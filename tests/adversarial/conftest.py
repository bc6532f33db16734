"""The adversarial suite's fixtures (defined in runs.py): a stopped run, a bundle and a search
index to tamper with."""

from runs import index, originals, work  # noqa: F401
