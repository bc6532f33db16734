"""The adversarial suite's fixtures (defined in runs.py): a stopped run and a bundle to tamper with."""

from runs import originals, work  # noqa: F401
