"""The training flows behind ``python -m sdml_ext.train``: a new run, a resumed run, modalities
added to a bundle, and one rank of a torchrun job. Each plans the run, trains (sdml_ext.engine.strategies
or sdml_ext.engine.distributed), evaluates and writes the bundle; the command line only parses and
dispatches. Errors are raised (ValueError and the classes of sdml_ext.errors); the command line
decides what the user sees and the exit status.

Where a run writes: ``config.out`` as the user gave it, resolved once (:func:`train_new`: the
default ``runs/<dataset>-<time>``); from then on the run's directory records it and
:attr:`RunDir.output <sdml_ext.engine.rundir.RunDir.output>` is the one place it is read from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import os
import sys
from pathlib import Path

from .._testing.pause import pause_point
from ..data import (
    BUILT_IN_DATASETS,
    Dataset,
    describe_dataset,
    detect_layout,
    load_dataset,
    load_modalities,
    reads_per_modality,
)
from ..eval.evaluation import encode_split, evaluate
from ..model import make_projection
from ..projection import load_projection
from ..store.bundle import MANIFEST, Bundle, add_to_bundle, bundle_lock, check_new_bundle_path, load, save_bundle
from . import distributed
from .config import RunConfig, resolve_config
from .progress import EpochBars
from .rundir import RunDir, run_dir_for
from .strategies import RunReport, train_tasks
from .training import make_tasks, training_cost


def train_new(config: RunConfig) -> None:
    """A new run: train, evaluate and write the bundle ``config.out`` (default
    runs/<dataset>-<time>). Parent directories it creates are removed again if the run fails."""
    out = Path(config.out or _default_out(config.dataset))
    made = _missing_parents(out)
    try:
        _train_new(config, out)
    except BaseException:
        for directory in made:  # deepest first; one that is not empty now is someone else's
            try:
                directory.rmdir()
            except OSError:
                break
        raise


def _missing_parents(path: Path) -> list[Path]:
    """The parent directories of `path` that do not exist yet, deepest first."""
    missing = []
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


def _train_new(config: RunConfig, out: Path) -> None:
    # Refuse an existing output (or the checkpoints of a stopped run on it) before any work is done.
    out = check_new_bundle_path(out)
    RunDir.check_free(run_dir_for(out))
    dataset = _load(config)
    names = config.modalities or dataset.modality_names
    config = dataclasses.replace(config, out=str(out))
    run = RunDir.create(run_dir_for(out), {"kind": "train", "config": config.to_dict()})
    _train_new_bundle(config, dataset, names, run)


def resume(path: str | os.PathLike) -> None:
    """Continue the stopped run at `path` (its OUT.partial directory, or OUT): its own saved
    settings, its checkpoints, its output."""
    run = RunDir.resume(path)
    config = resolve_config(run.record["config"])
    print(f"resuming {run.path}", file=sys.stderr)
    if run.record["kind"] == "add-modality":
        _add_run(config, run.record["names"], run.output, run)
        return
    dataset = _load(config)
    _train_new_bundle(config, dataset, list(config.modalities or dataset.modality_names), run)


def _projection(config: RunConfig, dataset: Dataset):
    """(P, source): drawn from the seed (source None), or read from --projection."""
    if config.projection is None:
        return make_projection(config.code_dim, dataset.num_classes, config.seed), None
    return load_projection(config.projection, config.code_dim, dataset.num_classes, config.projection_key)


def _train_new_bundle(config: RunConfig, dataset: Dataset, names: list[str], run: RunDir) -> None:
    """Train (continuing from the run's checkpoints) and write the bundle; then the run's
    checkpoints go. A run stopped after its bundle was written has nothing left to do."""
    out = run.output
    with run:
        if (out / MANIFEST).exists():
            print(f"\nbundle {out} was already written", file=sys.stderr)
        else:
            P, source = _projection(config, dataset)
            report = _train(config, dataset, names, P, first_index=0, checkpoints=run.checkpoints)
            _write_new_bundle(config, dataset, out, P, source, report)
    run.remove()


def _write_new_bundle(config: RunConfig, dataset: Dataset, out: Path, P, source, report: RunReport) -> None:
    # Evaluate the trained networks in memory first, so the bundle is written once, with its metrics.
    metrics = _evaluate(Bundle.unsaved(P, dataset.class_names, report.modalities), dataset)
    save_bundle(
        out,
        P=P,
        projection_seed=config.seed if source is None else None,
        projection_source=source,
        results=report.modalities,
        class_names=dataset.class_names,
        dataset={"name": dataset.name, "source": dataset.source, "multilabel": dataset.multilabel},
        config=config.to_dict(),
        run={"kind": "train", **report.summary()},  # its config is the bundle's
        metrics=metrics,
    )
    print(f"\nbundle written to {out}")


def add_modalities(into: str | os.PathLike, names: list[str], file_settings: dict, flags: dict) -> None:
    """Train the modalities `names` against the P of the bundle `into` and add them to it. The
    settings are the bundle's, then `file_settings` (a --config file), then `flags`."""
    bundle = load(into)
    detect_dataset(file_settings, flags, bundle.config.get("dataset", "mfeat"))
    base = {k: v for k, v in bundle.config.items() if k not in ("out", "modalities")}
    if "dataset" in file_settings or flags["dataset"] is not None:
        base.pop("data", None)  # a different dataset kind does not inherit the bundle's path
        base.pop("dataset_options", None)
    code_dim = int(bundle.P.shape[0])
    if flags["code_dim"] not in (None, code_dim):
        raise ValueError(f"the bundle's P is {code_dim}-d; an added modality must use --code-dim {code_dim}")
    config = resolve_config(base, file_settings, {**flags, "out": None, "modalities": names, "code_dim": code_dim})
    RunDir.check_free(run_dir_for(into))
    _add_run(config, list(names), Path(into), None)


def _add_run(config: RunConfig, names: list[str], into: Path, run: RunDir | None) -> None:
    """Train `names` and add them to the bundle `into`, holding the bundle's lock throughout, so
    that a concurrent add fails before it trains instead of one of them being lost."""
    with bundle_lock(into):
        bundle = load(into)
        if run is not None and set(names) <= set(bundle.modality_names):
            print(f"\n{', '.join(names)} were already added to {into}", file=sys.stderr)
            run.remove()
            return
        first_index = len(bundle.modality_names)
        if run is not None and run.record["first_index"] != first_index:
            raise ValueError(
                f"bundle {into} has changed since the stopped run began ({run.record['first_index']} modalities, "
                f"now {first_index}); remove {run.path} and add {', '.join(names)} again"
            )
        dataset = _load(config)
        _check_addable(bundle, dataset, names, into)
        if run is None:
            record = {"kind": "add-modality", "config": config.to_dict(), "into": str(into), "names": list(names),
                      "first_index": first_index}
            run = RunDir.create(run_dir_for(into), record)
        with run:
            report = _train(config, dataset, names, bundle.P, first_index=first_index, checkpoints=run.checkpoints)
            metrics = _evaluate(Bundle.unsaved(bundle.P, bundle.class_names, report.modalities, base=bundle), dataset)
            pause_point("bundle-add")
            add_to_bundle(into, report.modalities, metrics=metrics,
                          run={"kind": "add-modality", "config": config.to_dict(), **report.summary()})
            print(f"\nadded {', '.join(names)} to {into}")
        run.remove()


def _check_addable(bundle: Bundle, dataset: Dataset, names: list[str], into: Path) -> None:
    if dataset.class_names != bundle.class_names:
        raise ValueError(
            f"the dataset has {dataset.num_classes} classes {dataset.class_names[:5]}... but the bundle was "
            f"trained with {len(bundle.class_names)} classes {bundle.class_names[:5]}...; labels must mean the same classes"
        )
    taken = sorted(set(names) & set(bundle.modality_names))
    if taken:
        raise ValueError(f"bundle {into} already has modalities {taken}")


def absolute_data_paths(*layers: dict) -> None:
    """A relative data (or projection) path is taken relative to the current directory and stored
    absolute, so the bundle's `evaluate BUNDLE` and `--add-modality --into BUNDLE` work from anywhere."""
    for layer in layers:
        for name in ("data", "projection"):
            if isinstance(layer.get(name), str):
                layer[name] = os.path.abspath(layer[name])


def detect_dataset(file_settings: dict, flags: dict, inherited: str | None = None) -> None:
    """A data path without a dataset name: name the layout the file is in (unless the kind
    inherited from a bundle reads files itself)."""
    data = flags["data"] or file_settings.get("data")
    named = flags["dataset"] is not None or "dataset" in file_settings
    if data is not None and not named and (inherited is None or inherited in BUILT_IN_DATASETS):
        options = file_settings.get("dataset_options") or {}
        flags["dataset"] = detect_layout(data, options.get("n_val") if isinstance(options, dict) else None)


def _load(config: RunConfig) -> Dataset:
    dataset = load_dataset(config.dataset, config.data, **config.dataset_options)
    _chosen_modalities(config, dataset.name, dataset.modality_names)
    print(dataset.describe())
    return dataset


def _chosen_modalities(config: RunConfig, dataset: str, present: list[str]) -> list[str]:
    """The run's modalities (--modalities, default all), each present once."""
    chosen = config.modalities or []
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"modalities listed twice: {sorted({n for n in chosen if chosen.count(n) > 1})}")
    for name in chosen:
        if name not in present:
            raise ValueError(f"dataset {dataset!r} has no modality {name!r}; present: {', '.join(present)}")
    return list(chosen or present)


def _default_out(dataset: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{dataset}-{stamp}"
    n = 2
    while out.exists():
        out = Path("runs") / f"{dataset}-{stamp}-{n}"
        n += 1
    return out


def _tasks(config: RunConfig, dataset: Dataset, names: list[str], P, first_index: int):
    return make_tasks([dataset.modality(n) for n in names], P, config.train_options(), first_index=first_index)


def _train(config: RunConfig, dataset: Dataset, names: list[str], P, first_index: int, checkpoints=None) -> RunReport:
    tasks = _tasks(config, dataset, names, P, first_index)
    devices = config.resolved_devices()
    print(f"\ntraining {len(tasks)} modalities, strategy {config.strategy}, {config.epochs} epochs, on {', '.join(devices)}",
          file=sys.stderr)
    with EpochBars(names, config.epochs) as bars:
        report = train_tasks(tasks, config.strategy, devices, on_epoch=bars, checkpoints=checkpoints)
    print("\n" + report.table())
    return report


def train_rank(config: RunConfig, stop_process: distributed.StopProcess) -> None:
    """One rank of a torchrun job (see sdml_ext.engine.distributed): train this rank's modalities; rank 0
    writes the bundle and prints the tables. The same command run again (or restarted by torchrun)
    continues from every rank's checkpoints. `stop_process` ends this process when another rank
    fails (see :func:`sdml_ext.engine.distributed.train_distributed`).

    Every rank plans from the dataset's shapes (read from the arrays' headers where the layout
    allows), so it knows its modalities before it reads any features; then a rank other than 0
    reads only its own modalities. Rank 0 reads the whole dataset: it evaluates the bundle on
    every modality's test split."""
    if config.out is None:
        raise ValueError("under torchrun give --out: every rank must name the same output")
    out = Path(config.out)
    with distributed.Job() as job:
        if job.is_main and not run_dir_for(out).exists():
            check_new_bundle_path(out)
        # Rank 0 reads the whole dataset, and so does every rank for a layout read whole anyway;
        # the other ranks plan from the arrays' headers and then read their own modalities.
        where = (config.dataset, config.data)
        selective = not job.is_main and reads_per_modality(*where, **config.dataset_options)
        if selective:
            info = describe_dataset(*where, **config.dataset_options)
        else:
            with contextlib.redirect_stdout(sys.stdout if job.is_main else io.StringIO()):
                dataset = _load(config)
            info = dataset.info()
        names = _chosen_modalities(config, info.name, info.modality_names)
        options = config.train_options()
        costs = {i: training_cost(*info.shapes[n], options) for i, n in enumerate(names)}
        assignment = distributed.assign_ranks(list(costs.items()), job.world_size)
        own = [n for i, n in enumerate(names) if assignment[i] == job.rank]
        if selective:
            dataset = load_modalities(*where, own, **config.dataset_options) if own else None  # idle: nothing
        P, source = _projection(config, info)
        mine = [make_tasks([dataset.modality(n)], P, options, first_index=names.index(n))[0] for n in own]
        # Ranks sharing a host share the run directory, each with its own lock; rank 0's is the
        # output's lock, as in a single-process run.
        run = RunDir.create(run_dir_for(out), {"kind": "train", "config": config.to_dict()},
                            lock_name="lock" if job.is_main else f"lock-rank{job.rank}", exist_ok=True)
        run.uses_workers = False  # a rank trains its modalities in-process
        with run, (EpochBars(names, config.epochs) if job.is_main else contextlib.nullcontext()) as bars:
            report = distributed.train_distributed(job, names, costs, assignment, mine, config.epochs,
                                                   run.checkpoints, bars, stop_process)
            if job.is_main:
                bars.close()
                print("\n" + report.table())
                if not (run.output / MANIFEST).exists():
                    _write_new_bundle(config, dataset, run.output, P, source, report)
            distributed.barrier()  # the bundle is complete: every rank's checkpoints may go
        run.remove()


def _evaluate(bundle: Bundle, dataset: Dataset) -> dict:
    """Print the test split's mAP tables; return them as the manifest's metrics ({} for fewer
    than two modalities)."""
    if len(set(bundle.modality_names) & set(dataset.modality_names)) < 2:
        print("\none modality so far: no cross-modal table yet (add another with --add-modality)")
        return {}
    result = evaluate(encode_split(bundle, dataset, "test"))
    print("\n" + result.format())
    return {"test": result.to_json()}

