"""A reader that stops reading (``python -m sdml_ext.search query ... | head``) closes the pipe
our stdout writes into. Unix tools are then killed by SIGPIPE without a word; Python ignores
SIGPIPE and raises BrokenPipeError instead. These helpers let the command-line runner tell that
case from other broken pipes and end the same way, quietly, with the status a shell reports
for a tool killed by SIGPIPE."""

from __future__ import annotations

import os
import select
import signal
import sys

SIGPIPE_STATUS = 128 + signal.SIGPIPE  # 141: what a shell reports for a tool SIGPIPE killed


def stdout_closed() -> bool:
    """True when stdout is a pipe or socket whose reading end is gone (poll reports an error
    on the writing end)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)


def silence_stdout() -> None:
    """Point stdout's descriptor at /dev/null, so that the interpreter's last flush of what is
    still buffered does not fail a second time (and print "Exception ignored ...")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
