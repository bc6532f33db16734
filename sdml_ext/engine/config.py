"""The training run's configuration: defaults, a TOML file, command-line flags, in that order of
precedence. The resolved config is a plain dict saved in the bundle's manifest.

A TOML config file uses the same names as the command-line flags (with underscores), e.g.::

    dataset = "xmedia"
    data = "/data/XMediaFeatures.mat"
    strategy = "parallel"
    epochs = 200
    lr = [1e-4, 2e-4]          # first modality, then every later one
    devices = ["cuda:0", "cuda:1"]

    [dataset_options]          # keyword options of the dataset's loader
    n_val = 231
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field

import torch

from .strategies import STRATEGIES
from .training import TrainOptions


@dataclass(frozen=True)
class RunConfig(TrainOptions):
    """Every setting of a training run (see ``python -m sdml_ext.train --help``): the training
    hyper-parameters it inherits from :class:`~sdml_ext.engine.training.TrainOptions` (one name and one
    default each) and what the run reads, where it trains and where it writes.

    Sequences are stored as tuples. Use ``dataclasses.replace`` to change a setting.
    """

    dataset: str = "mfeat"
    data: str | None = None
    dataset_options: dict = field(default_factory=dict)
    modalities: tuple[str, ...] | None = None
    strategy: str = "parallel"
    projection: str | None = None
    projection_key: str | None = None
    devices: tuple[str, ...] = ("auto",)
    out: str | None = None

    def __post_init__(self):
        for name in ("modalities", "devices"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))  # frozen: normalise once
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        _check_devices(self.devices)

    def train_options(self) -> TrainOptions:
        """The training hyper-parameters alone (what each modality's task carries)."""
        return TrainOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainOptions)})

    def resolved_devices(self) -> list[str]:
        """``devices`` with "auto" replaced: the first CUDA device if there is one, else cpu."""
        if self.devices == ("auto",):
            return ["cuda:0"] if torch.cuda.is_available() else ["cpu"]
        return list(self.devices)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_devices(devices: tuple[str, ...]) -> None:
    """devices: ("auto",), ("cpu",) or one or more distinct CUDA devices ("cuda", "cuda:N")."""
    if devices == ("auto",):
        return
    if not devices:
        raise ValueError("devices is empty; use cpu, auto or CUDA devices such as cuda:0")
    parsed = []
    for d in devices:
        try:
            parsed.append(torch.device(d))
        except (RuntimeError, TypeError):
            raise ValueError(f"devices: {d!r} is not a device; use cpu, auto, cuda or cuda:N") from None
    kinds = {d.type for d in parsed}
    if not kinds <= {"cpu", "cuda"} or len(kinds) > 1 or (kinds == {"cpu"} and len(parsed) > 1):
        raise ValueError(f"devices must be cpu, auto, or one or more CUDA devices (cuda:N), got {list(devices)}")
    if len(set(parsed)) < len(parsed):
        raise ValueError(f"devices lists a device twice: {list(devices)}")


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


_SCALARS = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}


def _is(value, kind: str) -> bool:
    # bool is an int in Python, but `epochs = true` in a config is a mistake, not 1.
    return isinstance(value, _SCALARS[kind]) and (kind == "bool" or not isinstance(value, bool))


def _check_type(name: str, value, source: str):
    """Value of setting `name` checked against RunConfig's annotation (ints pass as floats;
    a sequence setting takes a list, stored as the annotated list or tuple)."""
    kind = _FIELDS[name].type
    if value is None and kind.endswith("| None"):
        return value
    base = kind.removesuffix(" | None")
    if base.startswith(("list[", "tuple[")):
        item = base[base.index("[") + 1 : -1].split(",")[0].strip()
        if isinstance(value, (list, tuple)) and all(_is(v, item) for v in value):
            items = [float(v) for v in value] if item == "float" else list(value)
            return tuple(items) if base.startswith("tuple[") else items
    elif _is(value, base):
        if base == "str" and not value.strip():  # never "not given", nor the current directory
            raise ValueError(f"{source}: setting {name!r} is empty; give a value or leave it out")
        return float(value) if base == "float" else value
    raise ValueError(f"{source}: setting {name!r} must be {kind.replace('tuple[', 'list[').replace(', ...', '')}, got {value!r}")


def load_config_file(path: str | os.PathLike) -> dict:
    """Settings from a TOML file, checked by name and type (not yet merged with defaults)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # a binary file fails to decode
        raise ValueError(f"config file {path} is not valid TOML (UTF-8 text): {exc}") from None
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValueError(f"config file {path}: unknown settings {unknown}; valid: {', '.join(_FIELDS)}")
    return {k: _check_type(k, v, f"config file {path}") for k, v in raw.items()}


def resolve_config(*layers: dict) -> RunConfig:
    """RunConfig from the defaults updated by each layer in turn (None values are skipped)."""
    settings: dict = {}
    for layer in layers:
        for name, value in layer.items():
            if name not in _FIELDS:
                raise ValueError(f"unknown setting {name!r}; valid: {', '.join(_FIELDS)}")
            if value is not None:
                settings[name] = _check_type(name, value, "settings")
    return RunConfig(**settings)
