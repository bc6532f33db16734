"""The trained model on disk: a bundle directory.

    BUNDLE/
      manifest.json              what the bundle holds (below); written last, the commit point
      projection.safetensors     P, [d, c] float32, stored once for all modalities
      modality-00.safetensors    one file per modality: DSAE weights of the kept epoch
      modality-01.safetensors    (encoder.*, decoder.*) and the fitted preprocess.* tensors
      ...

manifest.json: format and version, creation time, library versions, the resolved training
config, the dataset's name/source/class names, P's seed, shape and sha256, and per modality its
name, file, sha256, network options, preprocessing and training record (losses per epoch, kept
epoch, time, memory), plus the run's report and metrics.

Writes are atomic: a new bundle is assembled in a temporary sibling directory and renamed into
place; adding a modality writes its file under a temporary name, renames it, and then replaces
the manifest (os.replace), so a reader sees either the old bundle or the new one. Writers of an
existing bundle hold its lock file ``.lock`` (see sdml_ext.locking), so concurrent writers never
lose each other's changes: the later one fails at once. Loading reads JSON and safetensors only
(never pickle) and verifies every checksum.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file
from torch import Tensor

from .locking import exclusive
from .model import DSAE, tensor_checksum
from .preprocess import Preprocessor
from .testhooks import pause_point
from .training import ModalityResult

FORMAT = "sdml-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROJECTION_FILE = "projection.safetensors"
LOCK_FILE = ".lock"


class BundleError(ValueError):
    """A bundle path that is missing, not a bundle, corrupt, or cannot be written."""


def versions() -> dict:
    """Versions of what produced a bundle."""
    import safetensors

    from . import __version__

    return {
        "sdml_ext": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=False, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def json_safe(value):
    """JSON has no NaN: NaN/Inf floats (e.g. a loss with no validation data) become None."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def check_new_bundle_path(path: str | os.PathLike) -> Path:
    """Validate that a bundle can be created at `path`, before any training time is spent.

    The path must not exist (or be an empty directory) and its parent must be creatable and
    writable. Raises BundleError with what is wrong; never deletes anything.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        kind = "a bundle" if (path / MANIFEST).exists() else "a file" if path.is_file() else "a non-empty directory"
        raise BundleError(f"output {path} already exists ({kind}); choose another output path or remove it first")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.probe-")
        os.rmdir(probe)
    except OSError as exc:
        raise BundleError(f"cannot write the output {path}: {exc.strerror or exc}") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path, mode: int) -> None:
    """Give a file or directory the permissions a plain create would (mkdtemp makes 0700 and
    safetensors writes 0600, which would hide a bundle from the user's group)."""
    os.chmod(path, mode & ~_umask())


def _modality_file(index: int) -> str:
    return f"modality-{index:02d}.safetensors"


def _write_modality(directory: Path, result: ModalityResult, final_name: str) -> dict:
    """Write one modality's tensors (temporary name, then rename); return its manifest entry."""
    tmp = directory / f".{final_name}.tmp"
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in result.state.items()}
    save_file(arrays, str(tmp), metadata={"format": FORMAT, "modality": result.name})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _publish(tmp, 0o666)
    os.replace(tmp, directory / final_name)
    return {
        "name": result.name,
        "index": result.index,
        "file": final_name,
        "sha256": _file_sha256(directory / final_name),
        "input_dim": result.model_options["input_dim"],
        "model": result.model_options,
        "preprocess": result.preprocess,
        "training": json_safe(result.summary()),
    }


def save_bundle(
    path: str | os.PathLike,
    *,
    P: Tensor,
    projection_seed: int,
    results: Sequence[ModalityResult],
    class_names: Sequence[str],
    dataset: dict,
    config: dict,
    run: dict,
    metrics: dict | None = None,
) -> Path:
    """Write a new bundle at `path` atomically (see the module docstring); refuses to replace
    anything that exists. Returns the path.

    Args:
        P: [d, c] float32 projection. projection_seed: the seed it was drawn from.
        results: trained modalities, in bundle order (their .index must be 0..m-1).
        class_names: c names. dataset: {"name", "source", "multilabel", ...} provenance.
        config: the resolved training config. run: the run report's summary.
        metrics: evaluation results to record (e.g. the mAP tables).
    """
    path = check_new_bundle_path(path)
    if [r.index for r in results] != list(range(len(results))):
        raise ValueError(f"modality indices must be 0..{len(results) - 1} in order, got {[r.index for r in results]}")
    if len(class_names) != P.shape[1]:
        raise ValueError(f"{len(class_names)} class names but P has {P.shape[1]} columns")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        _publish(tmp, 0o777)
        save_file({"P": P.detach().cpu().contiguous().numpy()}, str(tmp / PROJECTION_FILE), metadata={"format": FORMAT})
        _publish(tmp / PROJECTION_FILE, 0o666)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "config": config,
            "dataset": dataset,
            "class_names": list(class_names),
            "projection": {
                "file": PROJECTION_FILE,
                "seed": int(projection_seed),
                "shape": list(P.shape),
                "sha256": tensor_checksum(P),
            },
            "modalities": [_write_modality(tmp, r, _modality_file(r.index)) for r in results],
            "runs": [json_safe(run)],
            "metrics": json_safe(metrics or {}),
        }
        _fsync_write_json(tmp / MANIFEST, manifest)
        pause_point("bundle-save")
        try:
            os.rename(tmp, path)  # fails (ENOTEMPTY/EEXIST) rather than replace a non-empty dir
        except OSError as exc:
            raise BundleError(f"cannot move the finished bundle into place at {path}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the bundle at `path`; BundleError if it is not a readable bundle."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not an SDML bundle (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an SDML bundle manifest (format is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle format version {manifest.get('format_version')} is not supported "
            f"(this sdml_ext reads version {FORMAT_VERSION})"
        )
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = path / f".{MANIFEST}.tmp"
    _fsync_write_json(tmp, manifest)
    os.replace(tmp, path / MANIFEST)


def bundle_lock(path: str | os.PathLike):
    """Context manager: hold the bundle's writer lock (LockedError, an OSError, if another
    process holds it). Nests within one process."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        read_manifest(path)  # the clear error for a missing or foreign directory
    return exclusive(path / LOCK_FILE, f"bundle {path}")


def add_to_bundle(path: str | os.PathLike, results: Sequence[ModalityResult], run: dict, metrics: dict | None = None) -> None:
    """Add trained modalities to an existing bundle, leaving its files untouched.

    New files are written first; the manifest replacement is the commit point, so an
    interrupted add leaves the old bundle as it was (an orphan file at most, which the next add
    overwrites). ``metrics``, if given, are merged into the manifest's metrics.
    """
    path = Path(path)
    with bundle_lock(path):
        _add_locked(path, results, run, metrics)


def _add_locked(path: Path, results: Sequence[ModalityResult], run: dict, metrics: dict | None) -> None:
    manifest = read_manifest(path)
    names = [m["name"] for m in manifest["modalities"]]
    first = len(names)
    for i, r in enumerate(results):
        if r.name in names:
            raise BundleError(f"bundle {path} already has a modality named {r.name!r}")
        if r.index != first + i:
            raise ValueError(f"new modality {r.name!r} has index {r.index}, expected {first + i}")
    try:
        entries = [_write_modality(path, r, _modality_file(r.index)) for r in results]
    except OSError as exc:
        raise BundleError(f"cannot write into bundle {path}: {exc.strerror or exc}") from None
    manifest["modalities"] += entries
    manifest["runs"].append(json_safe(run))
    manifest["metrics"].update(json_safe(metrics or {}))
    _write_manifest(path, manifest)


def set_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Merge evaluation results into a bundle's manifest (atomically)."""
    path = Path(path)
    with bundle_lock(path):
        manifest = read_manifest(path)
        manifest["metrics"].update(json_safe(metrics))
        _write_manifest(path, manifest)


class Bundle:
    """A loaded bundle: the projection, the class names and one encoder per modality.

    Use :func:`load`. ``encode(modality, x)`` maps raw features [n, D] (numpy or tensor, any
    real dtype) to common-space codes [n, d] float32 on CPU, applying the stored preprocessing.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        self.manifest = read_manifest(self.path)
        try:
            proj = self.manifest["projection"]
            self.P = self._load_tensors(proj["file"], None)["P"]
            if tensor_checksum(self.P) != proj["sha256"]:
                raise BundleError(f"{self.path / proj['file']}: P does not match the checksum in the manifest")
            self.projection_seed = int(proj["seed"])
            self.class_names: list[str] = list(self.manifest["class_names"])
            self._entries = {m["name"]: m for m in self.manifest["modalities"]}
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{self.path / MANIFEST}: malformed manifest (missing {exc})") from None
        self._models: dict[str, tuple[DSAE, Preprocessor]] = {}

    @property
    def modality_names(self) -> list[str]:
        return list(self._entries)

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    def input_dim(self, modality: str) -> int:
        return int(self._entry(modality)["input_dim"])

    def _entry(self, modality: str) -> dict:
        if modality not in self._entries:
            raise ValueError(f"bundle has no modality {modality!r}; it has: {', '.join(self._entries)}")
        return self._entries[modality]

    def _load_tensors(self, name: str, sha256: str | None) -> dict[str, Tensor]:
        file = self.path / name
        if not file.is_file():
            raise BundleError(f"bundle file missing: {file}")
        if sha256 is not None and _file_sha256(file) != sha256:
            raise BundleError(f"{file} does not match its checksum in the manifest (corrupt or replaced)")
        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise BundleError(f"{file}: unreadable safetensors file ({exc})") from None

    def network(self, modality: str) -> tuple[DSAE, Preprocessor]:
        """The modality's DSAE (eval mode, on the bundle's device) and its preprocessing."""
        if modality not in self._models:
            entry = self._entry(modality)
            tensors = self._load_tensors(entry["file"], entry["sha256"])
            model = DSAE(**entry["model"])
            weights = {k: v for k, v in tensors.items() if not k.startswith("preprocess.")}
            try:
                model.load_state_dict(weights)
            except RuntimeError as exc:
                raise BundleError(f"{self.path / entry['file']}: weights do not fit the network ({exc})") from None
            model.to(self.device).eval()
            self._models[modality] = (model, Preprocessor.from_tensors(entry["preprocess"], tensors))
        return self._models[modality]

    @torch.no_grad()
    def encode(self, modality: str, x, batch_size: int = 4096) -> Tensor:
        """Codes of raw features: x [n, D] -> [n, d] float32 CPU tensor (L2-normalised if the
        network normalises codes). Raises ValueError for a wrong width or non-finite input."""
        model, preprocessor = self.network(modality)
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if x.dim() != 2 or x.shape[1] != model.input_dim:
            raise ValueError(
                f"modality {modality!r} expects features of shape [n, {model.input_dim}], got {tuple(x.shape)}"
            )
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8, torch.bool)):
            raise ValueError(f"modality {modality!r}: features must be real numbers, got {x.dtype}")
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"modality {modality!r}: features contain NaN or Inf")
        out = [
            model.encode(preprocessor(x[i : i + batch_size].to(self.device))).cpu()
            for i in range(0, x.shape[0], batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, model.code_dim)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, modalities={self.modality_names}, classes={len(self.class_names)})"


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Open the bundle at `path` (see :class:`Bundle`)."""
    return Bundle(path, device)
