"""How idle OpenMP threads wait: the package's choice, made before torch loads its OpenMP runtime.

torch's CPU kernels run on OpenMP (GNU libgomp in the Linux wheels). By default an idle libgomp
thread spins for ~300,000 iterations before it sleeps, which is cheap on an idle machine but,
on one shared with other work, burns the core its partner thread needs: a 2-thread training
step was measured several times slower on a loaded 2-core machine (``benchmarks/RESULTS.md``).
With ``OMP_WAIT_POLICY=PASSIVE`` idle threads sleep at once.

libgomp reads the variable once, when it is loaded (at ``import torch``); Intel's runtime
reads it at its first parallel region. So the choice is made here, in the environment, by
``import sdml_ext`` before it imports torch: every ``python -m sdml_ext.*`` command and every
torchrun rank started with ``-m sdml_ext.train`` gets it, as does a program that imports
sdml_ext before torch. A program that imported torch first keeps the runtime's default in its
own process (nothing can change it after the runtime has started); the variable is still set
for the processes it starts, so the parallel strategy's workers wait passively. A value the
user set (any value, e.g. ``OMP_WAIT_POLICY=ACTIVE``) is left as it is.

This module must not import torch.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "OMP_WAIT_POLICY"
CHOICE = "PASSIVE"

_state = {"set_by_package": False, "in_time": False}


def choose() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE unless the environment names a policy already; remember
    whether the OpenMP runtime can still see it (torch not yet imported)."""
    _state["in_time"] = "torch" not in sys.modules
    if VARIABLE not in os.environ:
        os.environ[VARIABLE] = CHOICE
        _state["set_by_package"] = True


def describe() -> str:
    """One line saying which wait policy this process's OpenMP runtime uses, and why."""
    value = os.environ.get(VARIABLE)
    if not _state["set_by_package"]:
        return f"{VARIABLE}={value} (from the environment)"
    if _state["in_time"]:
        return f"{VARIABLE}={value} (chosen by sdml_ext before torch loaded OpenMP)"
    return (f"the OpenMP runtime's default wait policy in this process (torch was imported before sdml_ext; "
            f"{VARIABLE}={value} applies to the processes it starts)")
