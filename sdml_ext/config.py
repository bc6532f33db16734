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

from .model import DEFAULT_CODE_DIM, DEFAULT_HIDDEN
from .strategies import STRATEGIES
from .training import DEFAULT_LRS, TrainOptions

DEMO_EPOCHS = 40
"""Default epochs: a demo that finishes in a few minutes on 2 CPU cores (the authors use 200)."""


@dataclass
class RunConfig:
    """Every setting of a training run (see ``python -m sdml_ext.train --help``)."""

    dataset: str = "mfeat"
    data: str | None = None
    dataset_options: dict = field(default_factory=dict)
    modalities: list[str] | None = None
    strategy: str = "parallel"
    epochs: int = DEMO_EPOCHS
    batch_size: int = 100
    lam: float = 0.5
    lr: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    seed: int = 0
    code_dim: int = DEFAULT_CODE_DIM
    projection: str | None = None
    projection_key: str | None = None
    hidden: list[int] = field(default_factory=lambda: list(DEFAULT_HIDDEN))
    normalize_code: bool = True
    normalize_output: bool = True
    preprocess: str = "standardize"
    devices: list[str] = field(default_factory=lambda: ["auto"])
    out: str | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if self.code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {self.code_dim}")
        self.train_options()  # validates the hyper-parameters

    def train_options(self) -> TrainOptions:
        return TrainOptions(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lam=self.lam,
            lrs=tuple(self.lr),
            betas=tuple(self.betas),
            seed=self.seed,
            code_dim=self.code_dim,
            hidden=tuple(self.hidden),
            normalize_code=self.normalize_code,
            normalize_output=self.normalize_output,
            preprocess=self.preprocess,
        )

    def resolved_devices(self) -> list[str]:
        """``devices`` with "auto" replaced: the first CUDA device if there is one, else cpu."""
        if self.devices == ["auto"]:
            return ["cuda:0"] if torch.cuda.is_available() else ["cpu"]
        return list(self.devices)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


_SCALARS = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}


def _is(value, kind: str) -> bool:
    # bool is an int in Python, but `epochs = true` in a config is a mistake, not 1.
    return isinstance(value, _SCALARS[kind]) and (kind == "bool" or not isinstance(value, bool))


def _check_type(name: str, value, source: str):
    """Value of setting `name` checked against RunConfig's annotation (ints pass as floats)."""
    kind = _FIELDS[name].type
    if value is None and kind.endswith("| None"):
        return value
    base = kind.removesuffix(" | None")
    if base.startswith("list["):
        item = base[5:-1]
        if isinstance(value, list) and all(_is(v, item) for v in value):
            return [float(v) for v in value] if item == "float" else list(value)
    elif _is(value, base):
        return float(value) if base == "float" else value
    raise ValueError(f"{source}: setting {name!r} must be {kind}, got {value!r}")


def load_config_file(path: str | os.PathLike) -> dict:
    """Settings from a TOML file, checked by name and type (not yet merged with defaults)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
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
