"""The errors sdml_ext raises on purpose, in one place that every layer (storage, data, training
strategies, search, command-line tools) can import without pulling in the others.

User errors (bad input, a bundle that is not one, a modality whose data or settings make it
fail) are ValueErrors or carry a message meant for the user; the command-line tools print them
as one line and exit with status 2. A :class:`WorkerCrash` is not the user's fault (a bug, a
segfault, a worker killed by the system): the tools say so and exit with status 1.
"""

from __future__ import annotations


class BundleError(ValueError):
    """A bundle path that is missing, not a bundle, corrupt, or cannot be written."""


class MissingKeyError(KeyError, ValueError):
    """A required key is absent from a data file (a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class DataFileError(ValueError):
    """A data file whose own description of itself does not hold (a header that declares more
    data than the file has): corrupt or crafted. The message names the file (and key)."""


class LockedError(OSError):
    """Another process holds the lock (of a bundle or a run directory)."""


class SearchIndexError(ValueError):
    """An index path that is missing, not an index, corrupt, tampered with, or from another model."""


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type or dtype (a TypeError, and a ValueError like other bad input,
    so the command line reports it in one line)."""


class WorkerError(RuntimeError):
    """A modality failed while training (in a worker process or thread, or in-process).
    Raised as one of its two kinds below; catch this to catch both."""


class ModalityError(WorkerError):
    """A modality failed because of its data or settings (bad input, a diverging loss): a user
    error. The message names the modality and says what went wrong."""


class WorkerCrash(WorkerError):
    """Training stopped for a reason that is not the input's fault: an unexpected exception in
    a worker (a bug), a worker that died (segfault, killed, out of memory).

    detail: the worker's traceback or exit status, for SDML_DEBUG=1 and bug reports ("" if none).
    """

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class JobStopped(RuntimeError):
    """This rank of a distributed job stops because the job failed (a rank failed or vanished).

    message: the one line to print for the whole job, or None where another rank prints it.
    The command line exits with status 1 and leaves the run directory as it is (the other ranks
    and a restarted job still use it).
    """

    exit_status = 1

    def __init__(self, message: str | None):
        super().__init__(message or "the distributed job stopped")
        self.message = message


class UnsafePathError(ValueError):
    """A path read from disk (or a file found there) that would lead outside the folder it
    belongs to, through a symbolic link, or to something that is not a regular file."""
