"""``python -m sdml_ext.train``: train SDML, write a bundle, print the mAP table.

With no arguments: the embedded UCI digits (6 modalities), the parallel strategy and a demo
number of epochs; the bundle goes to runs/<dataset>-<time>. See ``--help``. This module parses
the command line and dispatches to the flows of :mod:`sdml_ext.engine.flows`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import DATASET_NAMES
from ..engine import distributed, flows
from ..engine.config import load_config_file, resolve_config
from ..engine.rundir import SUFFIX
from ..engine.strategies import STRATEGIES
from ..engine.training import DEFAULT_EPOCHS, PAPER_EPOCHS
from ..preprocess import PREPROCESS_MODES
from .arguments import check_paths, check_seed, refuse_empty
from .runner import run, stop_process


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


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The command line's arguments and its --config file's settings, with every refusal that
    needs no data read (also run by ``python -m sdml_ext.launch`` before it starts the ranks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_empty(parser, args)
    check_paths(parser, args, files=("config", "projection"), directories=("into", "resume"), new_directories=("out",))
    check_seed(args.seed)
    if args.resume is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v is not None and k != "resume"]
        if given:
            raise ValueError(f"--resume takes no other flag (the run's saved settings are used); got {', '.join(given)}")
        return args, {}
    if (args.add_modality is None) != (args.into is None):
        raise ValueError("--add-modality and --into go together: --add-modality NAME --into BUNDLE")
    file_settings = load_config_file(args.config) if args.config else {}

    def given(name: str) -> str | None:
        """How `name` was given: as a flag, in the --config file, or not at all (None)."""
        if getattr(args, name) is not None:
            return f"--{name.replace('_', '-')}"
        return f"{name} (in {args.config})" if file_settings.get(name) is not None else None

    if args.into is not None:
        if given("out"):
            raise ValueError(f"{given('out')} does not go with --add-modality: the modalities are added into the --into bundle")
        for flag in ("--projection", "--projection-key"):  # (a --config file's P is the bundle's, or unused)
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise ValueError(f"{flag} does not go with --add-modality: the modalities train against the --into bundle's P")
    elif given("projection_key") and not given("projection"):
        raise ValueError(f"{given('projection_key')} names P in a --projection file; give --projection FILE too")
    return args, file_settings


def main(argv: list[str] | None = None) -> int:
    args, file_settings = parse(argv)
    if args.resume is not None:
        flows.resume(args.resume)
        return 0
    flags = {k: getattr(args, k) for k in _FLAG_SETTINGS}
    flows.absolute_data_paths(file_settings, flags)
    if args.into is not None:
        flows.add_modalities(args.into, list(args.add_modality), file_settings, flags)
        return 0
    flows.detect_dataset(file_settings, flags)
    config = resolve_config(file_settings, flags)
    if config.out is not None and Path(config.out).name.endswith(SUFFIX):
        raise ValueError(f"--out {config.out}: names ending in {SUFFIX} are where runs keep their checkpoints "
                         f"(OUT{SUFFIX}); choose another name")
    if distributed.launched():
        flows.train_rank(config, stop_process)
    else:
        flows.train_new(config)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
