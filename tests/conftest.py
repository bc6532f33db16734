"""Loaded by pytest before any test module. It does one thing: import sdml_ext before anything
imports torch, so the test process gets the OpenMP wait policy the package chooses (OpenMP reads
it once, when torch loads it), as every ``python -m sdml_ext.*`` command does. Shared test code
lives in helpers.py; no test imports this file."""

import sdml_ext  # noqa: F401
