"""Pause points for the tests that stop a run at a chosen instant (a signal, a kill).

With ``SDML_TEST_PAUSE_AT=EVENT`` and ``SDML_TEST_PAUSE_FILE=PATH`` in the environment, the
process that reaches EVENT creates PATH (writing its pid) and waits until PATH is removed; the
test meanwhile signals or kills it, or removes the file to let it go on. Events:
``epoch:NAME:K`` (modality NAME finished epoch K and its checkpoint decision), ``bundle-save``
(a new bundle's files are written, not yet renamed into place), ``bundle-add`` (an add-modality
run holds the bundle's lock and is about to write into it). Without the variables this is a
dictionary lookup: inert outside the tests.
"""

from __future__ import annotations

import os
import time


def pause_point(event: str) -> None:
    if os.environ.get("SDML_TEST_PAUSE_AT") != event:
        return
    flag = os.environ["SDML_TEST_PAUSE_FILE"]
    with open(flag, "w") as f:
        f.write(str(os.getpid()))
    while os.path.exists(flag):
        time.sleep(0.05)
