"""The command lines: ``python -m sdml_ext.train`` (:mod:`.train`), ``python -m sdml_ext.evaluate``
(:mod:`.evaluate`) and ``python -m sdml_ext.search`` (:mod:`.search`). They parse arguments and
dispatch to the library; the shared runner (:mod:`.runner`) alone turns errors into messages and
exit statuses."""

from .runner import USER_ERRORS, run, stop_process

__all__ = ["USER_ERRORS", "run", "stop_process"]
