"""``python -m sdml_ext.train``: train SDML, write a bundle, print the mAP table.

With no arguments: the embedded UCI digits (6 modalities), the parallel strategy and a demo
number of epochs; the bundle goes to runs/<dataset>-<time>. See ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import io
import os
import sys
from pathlib import Path

from . import cli, distributed
from .bundle import MANIFEST, Bundle, add_to_bundle, bundle_lock, check_new_bundle_path, load, save_bundle
from .config import RunConfig, load_config_file, resolve_config
from .data import (
    BUILT_IN_DATASETS,
    DATASET_NAMES,
    Dataset,
    describe_dataset,
    detect_layout,
    load_dataset,
    load_modalities,
    reads_per_modality,
)
from .evaluation import encode_split, evaluate
from .model import make_projection
from .projection import load_projection
from .preprocess import PREPROCESS_MODES
from .progress import EpochBars
from .rundir import SUFFIX, RunDir, run_dir_for
from .strategies import STRATEGIES, RunReport, train_tasks
from .testhooks import pause_point
from .training import DEFAULT_EPOCHS, PAPER_EPOCHS, make_tasks, training_cost
from .wording import plural


def _csv(kind):
    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(s) for s in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # no prefix matching: a mistyped flag (--epoch) is an error, not another flag
        prog="python -m sdml_ext.train",
        description=(
            "Train SDML (Scalable Deep Multimodal Learning, SIGIR 2019): one deep supervised "
            "auto-encoder per modality against a shared fixed projection P. Writes a bundle "
            "(manifest.json + safetensors) and prints the mAP table of all ordered modality pairs "
            "on the test split. Settings come from the defaults, then --config, then the flags."
        ),
        epilog=(
            "examples:\n"
            "  python -m sdml_ext.train                                  # demo: embedded digits\n"
            "  python -m sdml_ext.train --data XMediaFeatures.mat --epochs 200     # layout detected: xmedia\n"
            "  python -m sdml_ext.train --dataset mfeat --modalities fou,fac,kar --out runs/three\n"
            "  python -m sdml_ext.train --add-modality pix --into runs/three\n"
            "  python -m sdml_ext.train --resume runs/three.partial            # continue a stopped run\n"
            "errors in the input print one line and exit with status 2 (SDML_DEBUG=1 shows the traceback)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_NAMES, metavar="NAME",
                      help=f"dataset kind: {', '.join(DATASET_NAMES)} (default: mfeat, the embedded UCI digits)")
    data.add_argument("--data", metavar="PATH",
                      help="data file or directory (every dataset but mfeat and synthetic); without --dataset its "
                           "layout is detected from its keys. Stored in the bundle as an absolute path")
    data.add_argument("--modalities", type=_csv(str), metavar="A,B,...",
                      help="train only these modalities, in this order (default: all)")
    train = p.add_argument_group("training")
    train.add_argument("--strategy", choices=STRATEGIES,
                       help="joint (SDML-1), serial (SDML-2) or parallel (SDML-3, default): same models, different time/memory")
    train.add_argument("--epochs", type=int, metavar="N", help=f"epochs per modality (default: {DEFAULT_EPOCHS}; the paper: {PAPER_EPOCHS})")
    train.add_argument("--batch-size", type=int, metavar="N", help="batch size (default: 100; the last incomplete batch is dropped)")
    train.add_argument("--lam", type=float, metavar="L", help="weight of the reconstruction term in [0, 1] (default: 0.5)")
    train.add_argument("--lr", type=_csv(float), metavar="LR[,LR...]",
                       help="Adam learning rate per modality; the last value repeats (default: 1e-4,2e-4)")
    train.add_argument("--seed", type=int, metavar="N",
                       help="seed of P and of every modality's initial weights and shuffles (default: 0)")
    train.add_argument("--projection", metavar="FILE",
                       help="read P from FILE (.mat, .npy, .npz, .safetensors; a d x k matrix, its first c columns, "
                            "checked to be orthonormal) instead of drawing it from --seed, e.g. the authors' "
                            "OrthP_512X512.mat; stored in the bundle with the file's path and sha256")
    train.add_argument("--projection-key", metavar="KEY",
                       help="name of P in the --projection file (default: its only matrix, or one named P/OrthP/projection)")
    train.add_argument("--code-dim", type=int, metavar="D", help="width d of the common space (default: 512; needs d >= classes)")
    train.add_argument("--preprocess", choices=PREPROCESS_MODES,
                       help="input scaling fitted on the train split and stored in the bundle (default: standardize; "
                            "the authors feed raw features: none reproduces them)")
    train.add_argument("--devices", type=_csv(str), metavar="DEV[,DEV...]",
                       help="cpu, or CUDA devices such as cuda:0,cuda:1 (parallel puts modalities on all; default: cuda:0 if present, else cpu)")
    out = p.add_argument_group("input/output")
    out.add_argument("--config", metavar="FILE", help="TOML file with any of these settings (names with underscores); flags override it")
    out.add_argument("--out", metavar="DIR", help="bundle directory to create; never overwritten (default: runs/<dataset>-<time>)")
    out.add_argument("--add-modality", type=_csv(str), metavar="NAME[,NAME]",
                     help="train only these modalities against the P of the bundle given by --into and add them to it")
    out.add_argument("--into", metavar="BUNDLE", help="the bundle --add-modality extends (its other networks are left untouched)")
    out.add_argument("--resume", metavar="RUN",
                     help="continue a stopped run from its checkpoints (RUN: the OUT.partial directory it printed), "
                          "with its saved settings; takes no other flag")
    return p


_FLAG_SETTINGS = ("dataset", "data", "modalities", "strategy", "epochs", "batch_size", "lam", "lr", "seed",
                  "code_dim", "projection", "projection_key", "preprocess", "devices", "out")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume is not None:
        return _resume(args)
    if (args.add_modality is None) != (args.into is None):
        raise ValueError("--add-modality and --into go together: --add-modality NAME --into BUNDLE")
    flags = {k: getattr(args, k) for k in _FLAG_SETTINGS}
    file_settings = load_config_file(args.config) if args.config else {}
    if args.into is not None and (args.out is not None or file_settings.get("out") is not None):
        where = "--out" if args.out is not None else f"out (in {args.config})"
        raise ValueError(f"{where} does not go with --add-modality: the modalities are added into the --into bundle")
    _absolute_data_paths(file_settings, flags)
    if args.into is not None:
        return _add_modalities(args, file_settings, flags)
    _detect_dataset(file_settings, flags)
    config = resolve_config(file_settings, flags)
    if config.out is not None and Path(config.out).name.endswith(SUFFIX):
        raise ValueError(f"--out {config.out}: names ending in {SUFFIX} are where runs keep their checkpoints "
                         f"(OUT{SUFFIX}); choose another name")
    if distributed.launched():
        return _train_distributed(config)
    out = Path(config.out or _default_out(config.dataset))
    made = _missing_parents(out)
    try:
        return _train_new(config, out)
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


def _train_new(config: RunConfig, out: Path) -> int:
    # Refuse an existing output (or the checkpoints of a stopped run on it) before any work is done.
    out = check_new_bundle_path(out)
    RunDir.check_free(run_dir_for(out))
    dataset = _load(config)
    names = config.modalities or dataset.modality_names
    config = dataclasses.replace(config, out=str(out))
    run = RunDir.create(run_dir_for(out), {"kind": "train", "config": config.to_dict()}, out)
    return _train_new_bundle(config, dataset, names, run)


def _resume(args) -> int:
    """--resume RUN: the stopped run's own settings, its checkpoints, its output."""
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v is not None and k != "resume"]
    if given:
        raise ValueError(f"--resume takes no other flag (the run's saved settings are used); got {', '.join(given)}")
    run = RunDir.resume(args.resume)
    config = resolve_config(run.record["config"])
    print(f"resuming {run.path}", file=sys.stderr)
    if run.record["kind"] == "add-modality":
        return _add_run(config, run.output, run.record["names"], run)
    dataset = _load(config)
    return _train_new_bundle(config, dataset, list(config.modalities or dataset.modality_names), run)


def _projection(config: RunConfig, dataset: Dataset):
    """(P, source): drawn from the seed (source None), or read from --projection."""
    if config.projection is None:
        return make_projection(config.code_dim, dataset.num_classes, config.seed), None
    return load_projection(config.projection, config.code_dim, dataset.num_classes, config.projection_key)


def _train_new_bundle(config: RunConfig, dataset: Dataset, names: list[str], run: RunDir) -> int:
    """Train (continuing from the run's checkpoints) and write the bundle; then the run's
    checkpoints go. A run stopped after its bundle was written has nothing left to do."""
    out = Path(config.out)
    with run:
        if (out / MANIFEST).exists():
            print(f"\nbundle {out} was already written", file=sys.stderr)
        else:
            P, source = _projection(config, dataset)
            report = _train(config, dataset, names, P, first_index=0, checkpoints=run.checkpoints)
            _write_new_bundle(config, dataset, out, P, source, report)
    run.remove()
    return 0


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


def _add_modalities(args, file_settings: dict, flags: dict) -> int:
    bundle = load(args.into)
    _check_new_names(bundle, args.add_modality, args.into)  # before any data is read or described
    _detect_dataset(file_settings, flags, bundle.config.get("dataset", "mfeat"))
    base = {k: v for k, v in bundle.config.items() if k not in ("out", "modalities")}
    if "dataset" in file_settings or flags["dataset"] is not None:
        base.pop("data", None)  # a different dataset kind does not inherit the bundle's path
        base.pop("dataset_options", None)
    code_dim = int(bundle.P.shape[0])
    if flags["code_dim"] not in (None, code_dim):
        raise ValueError(f"the bundle's P is {code_dim}-d; an added modality must use --code-dim {code_dim}")
    config = resolve_config(base, file_settings, {**flags, "out": None, "modalities": args.add_modality, "code_dim": code_dim})
    RunDir.check_free(run_dir_for(args.into))
    return _add_run(config, Path(args.into), list(args.add_modality), None)


def _add_run(config: RunConfig, into: Path, names: list[str], run: RunDir | None) -> int:
    """Train `names` and add them to the bundle `into`, holding the bundle's lock throughout, so
    that a concurrent add fails before it trains instead of one of them being lost."""
    with bundle_lock(into):
        bundle = load(into)
        if run is not None and set(names) <= set(bundle.modality_names):
            print(f"\n{', '.join(names)} were already added to {into}", file=sys.stderr)
            run.remove()
            return 0
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
            run = RunDir.create(run_dir_for(into), record, into)
        with run:
            report = _train(config, dataset, names, bundle.P, first_index=first_index, checkpoints=run.checkpoints)
            metrics = _evaluate(Bundle.unsaved(bundle.P, bundle.class_names, report.modalities, base=bundle), dataset)
            pause_point("bundle-add")
            add_to_bundle(into, report.modalities, metrics=metrics,
                          run={"kind": "add-modality", "config": config.to_dict(), **report.summary()})
            print(f"\nadded {', '.join(names)} to {into}")
        run.remove()
    return 0


def _check_addable(bundle: Bundle, dataset: Dataset, names: list[str], into: Path) -> None:
    if dataset.class_names != bundle.class_names:
        raise ValueError(
            f"the dataset has {dataset.num_classes} classes {dataset.class_names[:5]}... but the bundle was "
            f"trained with {len(bundle.class_names)} classes {bundle.class_names[:5]}...; labels must mean the same classes"
        )
    _check_new_names(bundle, names, into)


def _check_new_names(bundle: Bundle, names: list[str], into) -> None:
    taken = [n for n in names if n in bundle.modality_names]
    if taken:
        raise ValueError(f"bundle {into} already has {plural(len(taken), 'modality', 'modalities')} "
                         f"{', '.join(taken)}; add {'it' if len(taken) == 1 else 'them'} under another name")


def _absolute_data_paths(*layers: dict) -> None:
    """A relative data (or projection) path is taken relative to the current directory and stored
    absolute, so the bundle's `evaluate BUNDLE` and `--add-modality --into BUNDLE` work from anywhere."""
    for layer in layers:
        for name in ("data", "projection"):
            if isinstance(layer.get(name), str):
                layer[name] = os.path.abspath(layer[name])


def _detect_dataset(file_settings: dict, flags: dict, inherited: str | None = None) -> None:
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
    print(f"\ntraining {plural(len(tasks), 'modality', 'modalities')}, strategy {config.strategy}, {plural(config.epochs, 'epoch')}, on {', '.join(devices)}",
          file=sys.stderr)
    with EpochBars(names, config.epochs) as bars:
        report = train_tasks(tasks, config.strategy, devices, on_epoch=bars, checkpoints=checkpoints)
        bars.close({m.name: m.time_s for m in report.modalities})
    print("\n" + report.table())
    return report


def _train_distributed(config: RunConfig) -> int:
    """One rank of a torchrun job (see sdml_ext.distributed): train this rank's modalities; rank 0
    writes the bundle and prints the tables. The same command run again (or restarted by torchrun)
    continues from every rank's checkpoints.

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
        run = RunDir.create(run_dir_for(out), {"kind": "train", "config": config.to_dict()}, out,
                            lock_name="lock" if job.is_main else f"lock-rank{job.rank}", exist_ok=True)
        run.uses_workers = False  # a rank trains its modalities in-process
        run.continue_with = "the same command (every rank resumes from its checkpoints)"  # --resume is single-process
        with run, (EpochBars(names, config.epochs) if job.is_main else contextlib.nullcontext()) as bars:
            report = distributed.train_distributed(job, names, costs, assignment, mine, config.epochs,
                                                   run.checkpoints, bars)
            if job.is_main:
                bars.close({m.name: m.time_s for m in report.modalities})
                print("\n" + report.table())
                if not (out / MANIFEST).exists():
                    _write_new_bundle(config, dataset, out, P, source, report)
            distributed.barrier()  # the bundle is complete: every rank's checkpoints may go
        run.remove()
    return 0


def _evaluate(bundle: Bundle, dataset: Dataset) -> dict:
    """Print the test split's mAP tables; return them as the manifest's metrics ({} for fewer
    than two modalities)."""
    if len(set(bundle.modality_names) & set(dataset.modality_names)) < 2:
        print("\none modality so far: no cross-modal table yet (add another with --add-modality)")
        return {}
    result = evaluate(encode_split(bundle, dataset, "test"))
    print("\n" + result.format())
    return {"test": result.to_json()}


if __name__ == "__main__":
    sys.exit(cli.run(main))
