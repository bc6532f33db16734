"""The adversarial suite's fixtures (defined in runs.py): a stopped run, a bundle and a search
index to tamper with, and a small file system to fill up."""

from runs import disk, index, originals, work  # noqa: F401
