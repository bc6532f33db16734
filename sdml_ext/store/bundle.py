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
existing bundle hold its lock file ``.lock`` (see sdml_ext.store.locking), so concurrent writers never
lose each other's changes: the later one fails at once. Loading reads JSON and safetensors only
(never pickle), checks the manifest's schema once and verifies every checksum; a network is only
built once its weights file is known to hold it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.numpy import save as save_arrays
from safetensors.numpy import save_file
from safetensors.torch import load_file
from torch import Tensor

from ..devices import ready_device
from .._testing.pause import pause_point
from ..errors import BundleError
from ..model import DSAE
from ..preprocess import PREPROCESS_MODES, Preprocessor
from .files import (
    WriteFailed,
    json_safe,
    new_directory,
    publish,
    read_directory_manifest,
    sha256_file,
    tensor_checksum,
    write_atomic,
    write_json,
    write_json_atomic,
    writing,
)
from .locking import exclusive

if TYPE_CHECKING:  # the bundle writer reads trained results; it needs no part of the engine
    from ..engine.records import ModalityResult

FORMAT = "sdml-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROJECTION_FILE = "projection.safetensors"
LOCK_FILE = ".lock"


def versions() -> dict:
    """Versions of what produced a bundle."""
    import safetensors

    from .. import __version__

    return {
        "sdml_ext": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


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


def _modality_file(index: int) -> str:
    return f"modality-{index:02d}.safetensors"


def _write_modality(directory: Path, result: ModalityResult, final_name: str) -> dict:
    """Write one modality's tensors (atomically, see sdml_ext.store.files); return its manifest entry."""
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in result.state.items()}
    # One metadata key: safetensors writes its metadata map in a random order, so two keys would
    # make the same weights a different file (and sha256) from one save to the next.
    write_atomic(directory / final_name, save_arrays(arrays, metadata={"format": FORMAT}))
    return {
        "name": result.name,
        "index": result.index,
        "file": final_name,
        "sha256": sha256_file(directory / final_name),
        "input_dim": result.model_options["input_dim"],
        "model": result.model_options,
        "preprocess": result.preprocess,
        "training": json_safe(result.summary()),
    }


def save_bundle(
    path: str | os.PathLike,
    *,
    P: Tensor,
    projection_seed: int | None,
    projection_source: dict | None = None,
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
        P: [d, c] float32 projection. projection_seed: the seed it was drawn from, or None
            for a P read from a file, described by projection_source (see
            sdml_ext.projection.load_projection: file, key, the file's sha256, columns).
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
    with new_directory(path, error=BundleError, kind="bundle") as directory:
        tmp = directory.tmp
        with writing(path / PROJECTION_FILE):
            save_file({"P": P.detach().cpu().contiguous().numpy()}, str(tmp / PROJECTION_FILE), metadata={"format": FORMAT})
        publish(tmp / PROJECTION_FILE, 0o666)
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
                "seed": None if projection_seed is None else int(projection_seed),
                **({"source": json_safe(projection_source)} if projection_source is not None else {}),
                "shape": list(P.shape),
                "sha256": tensor_checksum(P),
            },
            "modalities": [_write_modality(tmp, r, _modality_file(r.index)) for r in results],
            "runs": [json_safe(run)],
            "metrics": json_safe(metrics or {}),
        }
        write_json(tmp / MANIFEST, manifest)
        pause_point("bundle-save")
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the bundle at `path`, its schema checked (see :func:`check_manifest`);
    BundleError naming the field if it is not a readable, well-formed bundle."""
    manifest = read_directory_manifest(path, MANIFEST, "bundle", BundleError)
    check_manifest(manifest, str(Path(path) / MANIFEST))
    return manifest


_MODEL_KEYS = {"input_dim": "int", "code_dim": "int", "hidden": "ints", "normalize_code": "bool", "normalize_output": "bool"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Schema:
    """Checks of one manifest's fields; every failure is a BundleError naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str):
        raise BundleError(f"{self.where}: malformed manifest: {field} {problem}")

    def get(self, obj: dict, key: str, field: str, kind: str):
        """obj[key] checked to be of `kind`: object, list, str, int (>= 1 for "count"), bool,
        ints (a non-empty list of counts), sha256, file (a plain name inside the bundle)."""
        if key not in obj:
            self.fail(field, "is missing")
        value = obj[key]
        is_int = isinstance(value, int) and not isinstance(value, bool)
        ok = {
            "object": isinstance(value, dict),
            "list": isinstance(value, list),
            "str": isinstance(value, str),
            "int": is_int,
            "count": is_int and value >= 1,
            "bool": isinstance(value, bool),
            "ints": isinstance(value, list) and bool(value)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value),
            "sha256": isinstance(value, str) and _SHA256.fullmatch(value) is not None,
            "file": isinstance(value, str) and _plain_file_name(value),
        }[kind]
        if not ok:
            wanted = {
                "object": "an object (mapping)", "list": "a list", "str": "a string", "int": "an integer",
                "count": "an integer >= 1", "bool": "true or false", "ints": "a non-empty list of integers >= 1",
                "sha256": "a sha256 hex digest", "file": "the name of a file inside the bundle directory",
            }[kind]
            self.fail(field, f"must be {wanted}, got {value!r}")
        return value


def _plain_file_name(name: str) -> bool:
    """A file directly in the bundle directory: no directory part, not absolute, not . or ..."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def check_manifest(manifest, where: str = MANIFEST) -> None:
    """Check a manifest's schema once, on load, so that nothing later trips over a missing or
    mistyped field: BundleError naming the first bad field (``modalities[1].model.hidden``).

    Sizes are checked against each other here (P's shape against the classes, every network's
    code width against P); that the weights files hold what the manifest says is checked when a
    network is loaded, before anything is allocated for it.
    """
    s = _Schema(where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: not an SDML bundle manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        s.fail("format_version", f"must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format version {version} is not supported (this sdml_ext reads version {FORMAT_VERSION})")
    for key in ("config", "dataset", "metrics"):
        s.get(manifest, key, key, "object")
    # What evaluating and extending a bundle read from its config to find the data again.
    config = manifest["config"]
    for key, kind in (("dataset", "str"), ("data", "str"), ("dataset_options", "object")):
        if config.get(key) is not None:
            s.get(config, key, f"config.{key}", kind)
    s.get(manifest, "runs", "runs", "list")
    class_names = s.get(manifest, "class_names", "class_names", "list")
    if not class_names or not all(isinstance(c, str) for c in class_names):
        s.fail("class_names", f"must be a non-empty list of strings, got {class_names!r}")
    proj = s.get(manifest, "projection", "projection", "object")
    s.get(proj, "file", "projection.file", "file")
    # A drawn P records its seed; one read from a file (--projection) has seed null and a source.
    if proj.get("seed", 0) is not None:
        s.get(proj, "seed", "projection.seed", "int")
    elif "source" not in proj:
        s.fail("projection.seed", "is null but projection.source (the file P was read from) is missing")
    if "source" in proj:
        s.get(proj, "source", "projection.source", "object")
    s.get(proj, "sha256", "projection.sha256", "sha256")
    shape = s.get(proj, "shape", "projection.shape", "ints")
    if len(shape) != 2 or shape[1] != len(class_names):
        s.fail("projection.shape", f"must be [d, {len(class_names)}] (one column per class), got {shape}")
    entries = s.get(manifest, "modalities", "modalities", "list")
    names: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"modalities[{i}]"
        if not isinstance(entry, dict):
            s.fail(at, f"must be an object (mapping), got {entry!r}")
        name = s.get(entry, "name", f"{at}.name", "str")
        if not name or name in names:
            s.fail(f"{at}.name", f"must be a non-empty name used once, got {name!r}")
        names.add(name)
        if s.get(entry, "index", f"{at}.index", "int") != i:
            s.fail(f"{at}.index", f"must be {i} (its position), got {entry['index']}")
        s.get(entry, "file", f"{at}.file", "file")
        s.get(entry, "sha256", f"{at}.sha256", "sha256")
        input_dim = s.get(entry, "input_dim", f"{at}.input_dim", "count")
        model = s.get(entry, "model", f"{at}.model", "object")
        extra = sorted(set(model) - set(_MODEL_KEYS))
        if extra:
            s.fail(f"{at}.model", f"has unknown keys {extra}; it holds exactly {', '.join(_MODEL_KEYS)}")
        for key, kind in _MODEL_KEYS.items():
            s.get(model, key, f"{at}.model.{key}", "count" if kind == "int" else kind)
        if model["input_dim"] != input_dim:
            s.fail(f"{at}.model.input_dim", f"is {model['input_dim']} but {at}.input_dim is {input_dim}")
        if model["code_dim"] != shape[0]:
            s.fail(f"{at}.model.code_dim", f"is {model['code_dim']} but P has {shape[0]} rows")
        if s.get(entry, "preprocess", f"{at}.preprocess", "str") not in PREPROCESS_MODES:
            s.fail(f"{at}.preprocess", f"must be one of {', '.join(PREPROCESS_MODES)}, got {entry['preprocess']!r}")
    files = [proj["file"], *(e["file"] for e in entries)]
    if len(set(files)) < len(files):
        s.fail("modalities[*].file", f"names a file twice: {files}")


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
    except WriteFailed as exc:
        raise BundleError(f"{exc}; the bundle is unchanged") from None
    except OSError as exc:
        raise BundleError(f"cannot write into bundle {path}: {exc.strerror or exc}") from None
    manifest["modalities"] += entries
    manifest["runs"].append(json_safe(run))
    manifest["metrics"].update(json_safe(metrics or {}))
    try:
        write_json_atomic(path / MANIFEST, manifest)
    except WriteFailed as exc:
        raise BundleError(f"{exc}; the bundle is unchanged") from None


class Bundle:
    """A loaded bundle: the projection, the class names and one encoder per modality.

    Use :func:`load` (or :meth:`unsaved` for a run's results not yet written).
    ``encode(modality, x)`` maps raw features [n, D] (numpy or tensor, any real dtype) to
    common-space codes [n, d] float32 on CPU, applying the stored preprocessing.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.path: Path | None = Path(path)
        self.device = ready_device(device)  # checked (a bad name or a missing GPU: ValueError) and initialised
        self.manifest = read_manifest(self.path)  # schema checked: the fields below exist
        proj = self.manifest["projection"]
        P = self._load_tensors(proj["file"], None)
        if set(P) != {"P"} or P["P"].dtype != torch.float32 or list(P["P"].shape) != proj["shape"]:
            got = {k: (str(v.dtype), list(v.shape)) for k, v in P.items()}
            raise BundleError(f"{self.path / proj['file']}: expected one float32 tensor P of shape {proj['shape']}, got {got}")
        self.P = P["P"]
        if tensor_checksum(self.P) != proj["sha256"]:
            raise BundleError(f"{self.path / proj['file']}: P does not match the checksum in the manifest")
        self.projection_seed = None if proj["seed"] is None else int(proj["seed"])
        self.projection_source: dict | None = proj.get("source")
        self.class_names: list[str] = list(self.manifest["class_names"])
        self._entries = {m["name"]: m for m in self.manifest["modalities"]}
        self._models: dict[str, tuple[DSAE, Preprocessor]] = {}

    @classmethod
    def unsaved(
        cls, P: Tensor, class_names: Sequence[str], results: Sequence[ModalityResult], base: Bundle | None = None
    ) -> Bundle:
        """A bundle of trained results held in memory, after `base`'s modalities if given: what
        the bundle will hold once written, so a run is evaluated before its bundle is written
        (once, metrics included). Its ``path`` is base's, or None."""
        self = cls.__new__(cls)
        self.path = base.path if base is not None else None
        self.device = torch.device("cpu")
        self.manifest = base.manifest if base is not None else {"config": {}}
        self.P, self.projection_seed = P, None if base is None else base.projection_seed
        self.projection_source = None if base is None else base.projection_source
        self.class_names = list(class_names)
        self._entries = dict(base._entries) if base is not None else {}
        self._models = dict(base._models) if base is not None else {}
        for r in results:
            self._entries[r.name] = {"name": r.name, "model": r.model_options, "input_dim": r.model_options["input_dim"]}
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in r.state.items()}
            self._models[r.name] = _network(r.model_options, r.preprocess, tensors, f"modality {r.name!r}")
        return self

    @property
    def modality_names(self) -> list[str]:
        return list(self._entries)

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def projection_sha256(self) -> str | None:
        """The checksum of P the manifest records (None for a bundle not yet written)."""
        return self.manifest.get("projection", {}).get("sha256")

    def network_sha256(self, modality: str) -> str | None:
        """The checksum of the modality's weights file (None until it is written); ValueError
        naming the bundle's modalities if it has no such modality."""
        return self._entry(modality).get("sha256")

    def input_dim(self, modality: str) -> int:
        return int(self._entry(modality)["input_dim"])

    def _entry(self, modality: str) -> dict:
        if modality not in self._entries:
            raise ValueError(f"bundle has no modality {modality!r}; it has: {', '.join(self._entries)}")
        return self._entries[modality]

    def _load_tensors(self, name: str, sha256: str | None) -> dict[str, Tensor]:
        file = self.path / name
        if file.is_symlink() and file.resolve().parent != self.path.resolve():
            raise BundleError(f"{file}: a link that leads outside the bundle directory ({file.resolve()}); refusing to read it")
        if not file.is_file():
            raise BundleError(f"bundle file missing: {file}")
        if sha256 is not None and sha256_file(file) != sha256:
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
            model, preprocessor = _network(entry["model"], entry["preprocess"], tensors, str(self.path / entry["file"]))
            self._models[modality] = (model.to(self.device), preprocessor)
        return self._models[modality]

    @torch.no_grad()
    def encode(self, modality: str, x, batch_size: int = 4096) -> Tensor:
        """Codes of raw features: x [n, D] -> [n, d] float32 CPU tensor (L2-normalised if the
        network normalises codes), encoded `batch_size` rows at a time. Raises ValueError for a
        wrong width, non-finite input or a batch_size that is not a positive integer."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
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
        codes = torch.cat(out) if out else torch.zeros(0, model.code_dim)
        bad = ~torch.isfinite(codes).all(1) | (codes == 0).all(1) if codes.shape[1] else torch.zeros(0, dtype=torch.bool)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"modality {modality!r}: features row {row} encodes to a {'zero' if torch.isfinite(codes[row]).all() else 'non-finite'} "
                f"code (largest |value| in the row: {float(x[row].abs().max()):.3g}); such a row cannot be searched: "
                f"scale the features to the range the network was trained on"
            )
        return codes

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "unsaved"
        return f"Bundle({where!r}, modalities={self.modality_names}, classes={len(self.class_names)})"


def _network(options: dict, preprocess: str, tensors: dict[str, Tensor], where: str) -> tuple[DSAE, Preprocessor]:
    """The DSAE with `options` made of the weights in `tensors` (its float32 ``encoder.*`` and
    ``decoder.*`` tensors; the ``preprocess.*`` ones fit the Preprocessor).

    The network is laid out on the meta device (no memory) and compared with the weights
    present before it takes them over, so manifest options that ask for a bigger network than
    the file holds fail here instead of allocating it.
    """
    weights = {k: v for k, v in tensors.items() if not k.startswith("preprocess.")}
    with torch.device("meta"):
        model = DSAE(**options)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    present = {k: list(v.shape) for k, v in weights.items()}
    if expected != present:
        diff = sorted(set(expected) ^ set(present)) or [k for k in expected if expected[k] != present[k]]
        k = diff[0]
        raise BundleError(
            f"{where}: the weights do not fit the network the manifest describes ({options}): "
            f"{k} is {present.get(k, 'absent')} in the file, {expected.get(k, 'not part of the network')} in the network"
        )
    bad = sorted(k for k, v in weights.items() if v.dtype != torch.float32)
    if bad:
        raise BundleError(f"{where}: weight {bad[0]} is {weights[bad[0]].dtype}, expected float32")
    model.load_state_dict(weights, assign=True)  # the loaded tensors become the parameters
    try:
        preprocessor = Preprocessor.from_tensors(preprocess, tensors, dim=options["input_dim"])
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from None
    return model.eval(), preprocessor


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Open the bundle at `path` (see :class:`Bundle`)."""
    return Bundle(path, device)
