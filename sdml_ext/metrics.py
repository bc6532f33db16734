"""``sdml_ext.metrics``, the public name of :mod:`sdml_ext.eval.metrics` (cross-modal mAP tables
and precision curves)."""

from .eval.metrics import *  # noqa: F401,F403
from .eval.metrics import __all__  # noqa: F401
