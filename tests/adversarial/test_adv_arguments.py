"""Bad command-line arguments are refused before any work, in one line naming the flag, exit
status 2, by every command line (train, evaluate, search, launch): an empty value is never taken
for "not given" (a default) nor for the current directory, a seed outside numpy's range, a
--projection-key without a --projection, a directory where a file goes and a file where a
directory goes, faiss options that cannot work together."""

import pytest

from helpers import run_main
from runs import one_error_line, search, train
from sdml_ext.cli import evaluate as evaluate_cli
from sdml_ext.cli import launch as launch_cli

RUN = ["--config", "small.toml", "--data", "good3.npz"]
NEVER = ["--out", "never"]  # a run that got past its checks would create it

TRAIN = [
    ([*RUN, "--out", ""], "--out is empty"),
    (["--config", "", "--data", "good3.npz", *NEVER], "--config is empty"),
    (["--config", "small.toml", "--data", "", *NEVER], "--data is empty"),
    ([*RUN, "--projection", "", *NEVER], "--projection is empty"),
    ([*RUN, "--projection-key", "", *NEVER], "--projection-key is empty"),
    ([*RUN, "--strategy", "serial", "--devices", "cpu", "--modalities", "m0", "--seed", "-1", *NEVER], "--seed"),
    ([*RUN, "--seed", str(2**32), *NEVER], "--seed must be in [0, 4294967295]"),
    ([*RUN, "--projection-key", "P", *NEVER], "--projection-key names P in a --projection file"),
    (["--resume", ""], "--resume is empty"),
    (["--resume", "small.toml"], "--resume small.toml is a file"),
    (["--add-modality", "m2", "--into", ""], "--into is empty"),
    (["--add-modality", "m2", "--into", "small.toml"], "--into small.toml is a file"),
    (["--add-modality", "m2", "--into", "B", "--projection", "P.npy"], "--projection does not go with --add-modality"),
    (["--add-modality", "m2", "--into", "B", "--projection-key", "P"], "--projection-key does not go with --add-modality"),
    (["--config", "B", "--data", "good3.npz", *NEVER], "--config B is a directory"),
    ([*RUN, "--projection", "B", *NEVER], "--projection B is a directory"),
    ([*RUN, "--out", "small.toml"], "--out small.toml is a file"),
]


@pytest.mark.parametrize("argv,words", TRAIN, ids=[" ".join(a) for a, _ in TRAIN])
def test_train(work, capsys, argv, words):
    before = sorted(p.name for p in work.iterdir())
    code, _, err = train(argv, capsys)
    assert code == 2 and words in one_error_line(err)
    assert sorted(p.name for p in work.iterdir()) == before  # nothing created


@pytest.mark.parametrize("setting,words", [
    ('projection_key = "P"', "projection_key (in bad.toml) names P in a --projection file"),
    ("seed = -1", "seed must be in [0, 4294967295]"),
    (f"seed = {2**32}", "seed must be in [0, 4294967295]"),
    ('data = ""', "setting 'data' is empty"),
    ('out = " "', "setting 'out' is empty"),
    ('projection = ""', "setting 'projection' is empty"),
])
def test_train_config_file_settings(work, capsys, setting, words):
    (work / "bad.toml").write_text((work / "small.toml").read_text() + setting + "\n")
    code, _, err = train(["--config", "bad.toml", "--data", "good3.npz", *NEVER], capsys)
    assert code == 2 and words in one_error_line(err)
    assert not (work / "never").exists() and not (work / "never.partial").exists()


EVALUATE = [
    ([""], "the BUNDLE argument is empty"),
    (["B", "--out", ""], "--out is empty"),
    (["B", "--data", ""], "--data is empty"),
    (["B", "--device", ""], "--device is empty"),
    (["small.toml"], "BUNDLE small.toml is a file"),
    (["B", "--out", "small.toml"], "--out small.toml is a file"),
    (["B", "--k", "0"], "--k must be >= 1"),
]


@pytest.mark.parametrize("argv,words", EVALUATE, ids=[" ".join(a) for a, _ in EVALUATE])
def test_evaluate(work, capsys, argv, words):
    code, _, err = run_main(evaluate_cli.main, argv, capsys)
    assert code == 2 and words in one_error_line(err)
    assert not (work / "B" / "evaluation").exists()


BUILD = ["build", "B", "--modality", "m0", "--features", "good3.npz"]
QUERY = ["query", "idx", "--modality", "m1", "--features", "good3.npz"]
FAISS = ["export-faiss", "idx", "--out", "f.faiss"]
SEARCH = [
    (["build", "B", "--modality", "m0", "--features", "", "--out", "i"], "--features is empty"),
    (["build", "B", "--modality", "", "--features", "good3.npz", "--out", "i"], "--modality is empty"),
    (["build", "B", "--modality", "m0", "--data", "", "--out", "i"], "--data is empty"),
    ([*BUILD, "--out", ""], "--out is empty"),
    ([*BUILD, "--ids", "", "--out", "i"], "--ids is empty"),
    ([*BUILD, "--key", "", "--out", "i"], "--key is empty"),
    ([*BUILD, "--device", "", "--out", "i"], "--device is empty"),
    (["build", "", "--modality", "m0", "--features", "good3.npz", "--out", "i"], "the BUNDLE argument is empty"),
    ([*BUILD, "--ids", "B", "--out", "i"], "--ids B is a directory"),
    ([*BUILD, "--out", "small.toml"], "--out small.toml is a file"),
    (["build", "small.toml", "--modality", "m0", "--features", "good3.npz", "--out", "i"], "BUNDLE small.toml is a file"),
    ([*BUILD, "--shard-rows", "0", "--out", "i"], "--shard-rows must be >= 1"),
    (["query", "", "--modality", "m1", "--features", "good3.npz"], "the INDEX argument is empty"),
    ([*QUERY, "--out", ""], "--out is empty"),
    ([*QUERY, "--bundle", ""], "--bundle is empty"),
    ([*QUERY, "--out", "B"], "--out B is a directory"),
    (["query", "small.toml", "--modality", "m1", "--features", "good3.npz"], "INDEX small.toml is a file"),
    ([*QUERY, "--bundle", "small.toml"], "--bundle small.toml is a file"),
    (["export-faiss", "idx", "--out", ""], "--out is empty"),
    (["export-faiss", "idx", "--out", "B"], "--out B is a directory"),
    (["export-faiss", "small.toml", "--out", "f.faiss"], "INDEX small.toml is a file"),
    ([*FAISS, "--nlist", "4", "--nprobe", "5"], "--nprobe 5 is more than --nlist 4"),
    ([*FAISS, "--nprobe", "0"], "--nprobe must be an integer >= 1"),
    ([*FAISS, "--nprobe", "-5"], "--nprobe must be an integer >= 1"),
    ([*FAISS, "--nlist", "0"], "--nlist must be an integer >= 1"),
    ([*FAISS, "--nlist", "-1"], "--nlist must be an integer >= 1"),
    ([*FAISS, "--kind", "hnsw", "--nlist", "8"], "--nlist applies to kind ivf, not hnsw"),
    ([*FAISS, "--kind", "hnsw", "--nprobe", "8"], "--nprobe applies to kind ivf, not hnsw"),
    (["export-data", "mfeat", "--out", ""], "--out is empty"),
    (["export-data", "mfeat", "--out", "B"], "--out B is a directory"),
    (["export-data", "synthetic", "--data", "", "--out", "d.npz"], "--data is empty"),
]


@pytest.mark.parametrize("argv,words", SEARCH, ids=[" ".join(a) for a, _ in SEARCH])
def test_search(work, capsys, argv, words):
    before = sorted(p.name for p in work.iterdir())
    code, _, err = search(argv, capsys)
    assert code == 2 and words in one_error_line(err)
    assert sorted(p.name for p in work.iterdir()) == before


def test_nprobe_more_than_the_default_nlist_is_refused_before_the_quantizer_trains(index, capsys, monkeypatch):
    faiss = pytest.importorskip("faiss", reason="faiss is optional (pip install faiss-cpu)")
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda *a: pytest.fail("the quantizer was trained"))
    code, _, err = search([*FAISS, "--nprobe", "5"], capsys)  # 60 items: the default nlist is 1
    assert code == 2 and "--nprobe must be in [1, nlist=1], got 5" in one_error_line(err)


TRAIN_MODULE = ["-m", "sdml_ext.train", *RUN]
LAUNCH = [
    (["--standalone", "--nproc-per-node=2", *TRAIN_MODULE, "--out", ""], "--out is empty"),
    (["--standalone", "--nproc-per-node=2", *TRAIN_MODULE, "--seed", "-1", *NEVER], "--seed must be in"),
    (["--standalone", "--nproc-per-node=2", *TRAIN_MODULE, "--projection-key", "P", *NEVER], "--projection-key names P"),
    (["--standalone", "--nproc-per-node=2", *TRAIN_MODULE, "--config", "B", *NEVER], "--config B is a directory"),
    (["--standalone", "--nproc-per-node=", *TRAIN_MODULE, *NEVER], "--nproc-per-node is empty"),
    (["--standalone", "--nproc-per-node=0", *TRAIN_MODULE, *NEVER], "--nproc-per-node must be >= 1"),
    (["--standalone", "--nproc-per-node=-2", *TRAIN_MODULE, *NEVER], "--nproc-per-node must be >= 1"),
    (["--standalone", "--nnodes=0", *TRAIN_MODULE, *NEVER], "--nnodes must be >= 1"),
    (["--standalone", "--nnodes=2:1", *TRAIN_MODULE, *NEVER], "--nnodes 2:1: MIN is more than MAX"),
    (["--standalone", "--nnodes=two", *TRAIN_MODULE, *NEVER], "--nnodes must be a whole number"),
    (["--standalone", "--max-restarts=-1", *TRAIN_MODULE, *NEVER], "--max-restarts must be >= 0"),
    (["--standalone", "--log-dir", "", *TRAIN_MODULE, *NEVER], "--log-dir is empty"),
    (["--standalone", "-m", ""], "the TRAINING_SCRIPT argument is empty"),
]


@pytest.mark.parametrize("argv,words", LAUNCH, ids=[" ".join(a) for a, _ in LAUNCH])
def test_launch_refuses_before_any_rank_starts(work, capsys, monkeypatch, argv, words):
    from torch.distributed import run as torchrun

    monkeypatch.setattr(torchrun, "run", lambda args: pytest.fail("the agent started the ranks"))
    code = launch_cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and words in one_error_line(err)
    assert not (work / "never").exists()


def test_launch_passes_good_arguments_on_to_the_agent(work, capsys, monkeypatch):
    """The checks refuse only bad arguments: a good command reaches torchrun's agent."""
    from torch.distributed import run as torchrun

    started = []
    monkeypatch.setattr(torchrun, "run", started.append)
    assert launch_cli.main(["--standalone", "--nproc-per-node=2", *TRAIN_MODULE, "--seed", str(2**32 - 1), *NEVER]) == 0
    assert len(started) == 1 and started[0].training_script_args[-2:] == NEVER
