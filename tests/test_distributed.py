"""Data-parallel training: `mpiexec -n 2 minivit train` (and `pretrain`, MAE and DINO) trains
the weights one process trains, resumes across process counts, writes only from rank 0, and
stops every rank when one fails.

The multi-process tests spawn mpiexec (the `dist` extra: mpi4py and the mpich wheel) and skip
without it; the rest run in this process, where minivit.distributed acts as rank 0 of 1."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import stop_after

from minivit import backend, distributed as dist
from minivit.checkpoint import read_checkpoint
from minivit.errors import MinivitError
from minivit.io import load_weights
from minivit.pretrain import PretrainConfig, pretrain
from minivit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "distributed_runner.py"
# float64, no dropout/drop-path/augmentation: the runs must agree to rounding. digits has 1,438
# training images: 12 steps of 128 per epoch, the last one of 30.
OPTIONS = dict(dataset="digits", model="vit_digits", batch_size=128, warmup=1,
               drop_path=0.0, label_smoothing=0.0, augment=False, dtype="float64", seed=3)
# pretrain: the same batches; DINO with its default head batch norm (synchronised over the
# processes), 2 local crops and the colour jitter on, so that every random number is shared
PRETRAIN = dict(dataset="digits", model="vit_digits", batch_size=128, warmup=1,
                dtype="float64", seed=3)
DINO_MEASURES = ("loss", "teacher_entropy", "teacher_marginal_entropy", "center_norm")


def _mpiexec():
    """The mpiexec of the `dist` extra (next to this Python) or on PATH; None without mpi4py."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="the dist extra (mpi4py, mpiexec) "
                                                           "is not installed")


def flags(**options):
    """Command-line flags for `options` (TrainConfig or PretrainConfig fields)."""
    names = {"augment": None, "checkpoint_format": "--format"}
    args = [] if options.get("augment", True) else ["--no-augment"]
    for name, value in options.items():
        if name not in names and value is not False:
            args += ["--" + name.replace("_", "-")] + ([] if value is True else [str(value)])
    return args


def mpiexec_minivit(processes, out, fail=None, command="train", **options):
    """`mpiexec -n processes minivit COMMAND --out out ...` through tests/distributed_runner.py,
    one thread each; the CompletedProcess. A hang would end at the timeout, failing the test."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in dist.LAUNCHER_VARIABLES}
    environment.update(PYTHONPATH=str(ROOT), MINIVIT_NUM_THREADS="1", OMP_NUM_THREADS="1",
                       OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fail:
        environment["MINIVIT_TEST_FAIL"] = fail
    launch = [MPIEXEC, "-n", str(processes), sys.executable, str(RUNNER), command, "--out",
              str(out), "--quiet", *flags(**options)]
    return subprocess.run(launch, env=environment, capture_output=True, text=True, timeout=240)


def assert_same_run(one, two, measures=("loss", "accuracy"), atol=1e-12):
    """The two run folders hold the same weights and optimizer state (to 1e-10, and `atol`)
    and the same metrics (`measures` of each record, summed over the ranks)."""
    first, _ = load_weights(one / "last.safetensors")
    second, _ = load_weights(two / "last.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_allclose(second[key], first[key], rtol=1e-10, atol=atol, err_msg=key)
    metrics = [(folder / "metrics.jsonl").read_text().splitlines() for folder in (one, two)]
    assert len(metrics[0]) == len(metrics[1])
    for a, b in zip(*metrics):
        a, b = json.loads(a), json.loads(b)
        assert a.keys() == b.keys()
        for key in measures:
            assert b[key] == pytest.approx(a[key], rel=1e-10), (key, a, b)


@needs_mpiexec
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_two_processes_train_the_weights_of_one(tmp_path, optimizer):
    """AdamW: 2 processes train epoch 1, 1 process resumes for epoch 2. SGD: the other way
    round. Each is compared with 1 process training both epochs straight."""
    options = dict(OPTIONS, optimizer=optimizer)
    config = TrainConfig(**options, epochs=2, progress=False)
    train(TrainConfig(**dict(vars(config), out=str(tmp_path / "one"))))
    mixed = tmp_path / "mixed"
    if optimizer == "adamw":
        done = mpiexec_minivit(2, mixed, epochs=1, **options)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("test accuracy") == 1, done.stdout  # rank 0 reports alone
        train(TrainConfig(**dict(vars(config), out=str(mixed), resume=True)))
    else:
        train(TrainConfig(**dict(vars(config), out=str(mixed), epochs=1)))
        done = mpiexec_minivit(2, mixed, resume=True, epochs=2)
        assert done.returncode == 0, done.stderr
    assert_same_run(tmp_path / "one", mixed)


@needs_mpiexec
@pytest.mark.parametrize("command, kind", [("train", "raise"), ("train", "nan"),
                                           ("pretrain", "raise")])
def test_a_failing_rank_stops_every_rank_and_keeps_the_checkpoint(tmp_path, command, kind):
    """Rank 1 fails at step 15 (epoch 2 of 12-step epochs): both processes end (no hang
    until the timeout), non-zero, with rank 1's message; epoch 1's checkpoint is intact."""
    out = tmp_path / "run"
    options = OPTIONS if command == "train" else dict(PRETRAIN, method="mae")
    done = mpiexec_minivit(2, out, fail=f"1:15:{kind}", command=command, epochs=3, **options)
    assert done.returncode != 0
    expected = "injected failure at step 15" if kind == "raise" else "the loss became nan"
    assert "error on rank 1 of 2" in done.stderr and expected in done.stderr, done.stderr
    _, _, info = read_checkpoint(out / "last.safetensors")
    assert info["epoch"] == 1
    assert not [path.name for path in out.iterdir() if ".tmp" in path.name]


@needs_mpiexec
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_ctrl_c_on_one_rank_ends_every_rank_with_the_resume_advice(tmp_path, command):
    """Rank 1 takes Ctrl-C at step 15 while rank 0 waits for it in the all-reduce (as when
    Ctrl-C reaches a rank blocked in a collective): before, rank 1 exited and rank 0 waited for
    ever; now every process ends, with the advice, and epoch 1's checkpoint stays."""
    out = tmp_path / "run"
    options = OPTIONS if command == "train" else dict(PRETRAIN, method="mae")
    done = mpiexec_minivit(2, out, fail="1:15:interrupt", command=command, epochs=3, **options)
    assert done.returncode != 0
    assert f"minivit {command}: interrupted" in done.stderr, done.stderr
    assert f"minivit {command} --resume --out {out}" in done.stderr, done.stderr
    _, _, info = read_checkpoint(out / "last.safetensors")
    assert info["epoch"] == 1


@needs_mpiexec
@pytest.mark.skipif(not backend.cupy_available(), reason="CuPy or a CUDA GPU is not available")
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_cupy_ranks_train_the_weights_of_one_cupy_process(tmp_path, command):
    """The cupy backend: 1 rank (NCCL, when CuPy has it), and 2 ranks (NCCL with a GPU each;
    host copies over MPI when they share one) train the weights of a plain 1-process run.
    pretrain: DINO, its head's batch norms synchronised on the GPU."""
    import cupy

    one = tmp_path / "one"
    if command == "train":
        options = dict(OPTIONS, backend="cupy", epochs=2)
        measures, atol = ("loss", "accuracy"), 1e-12
        train(TrainConfig(**options, out=str(one), progress=False))
    else:  # atol: see test_two_processes_pretrain_the_weights_of_one
        options = dict(PRETRAIN, method="dino", backend="cupy", epochs=1)
        measures, atol = DINO_MEASURES, 1e-10
        pretrain(PretrainConfig(**options, out=str(one), progress=False))
    nccl = dist._nccl_module() is not None
    for processes in (1, 2):
        out = tmp_path / f"ranks{processes}"
        done = mpiexec_minivit(processes, out, command=command, **options)
        assert done.returncode == 0, done.stderr
        own_gpus = processes <= cupy.cuda.runtime.getDeviceCount()
        transport = "nccl" if nccl and own_gpus else "mpi (host copies)"
        assert f"all-reduced over {transport}" in done.stdout, done.stdout
        print(f"{command}, {processes} rank(s): {transport}")  # shown by gpu_check.sh
        assert_same_run(one, out, measures, atol)


@needs_mpiexec
@pytest.mark.parametrize("method", ["mae", "dino"])
def test_two_processes_pretrain_the_weights_of_one(tmp_path, method):
    """MAE: 2 processes pretrain epoch 1 (of warm-up: the schedule is that of 2 epochs), 1
    process resumes for epoch 2; DINO the other way round (epoch 1 has the head's last layer
    frozen, epoch 2 not). Each against 1 process
    pretraining both epochs straight: every weight (DINO: student, teacher and center) and
    the optimizer's state to 1e-10, and the logged loss (DINO: entropies, center norm)."""
    options = dict(PRETRAIN, method=method, **({"color_jitter": True} if method == "dino"
                                                  else {}))
    config = PretrainConfig(**options, epochs=2, progress=False)
    pretrain(dataclasses.replace(config, out=str(tmp_path / "one")))
    mixed = tmp_path / "mixed"
    if method == "mae":
        done = mpiexec_minivit(2, mixed, command="pretrain", epochs=1, **options)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("loss") == 1, done.stdout  # rank 0 reports alone
        pretrain(dataclasses.replace(config, out=str(mixed), resume=True))
    else:  # stopped after epoch 1 of 2 (the teacher's momentum follows the planned steps)
        with pytest.raises(KeyboardInterrupt):
            pretrain(dataclasses.replace(config, out=str(mixed)), on_epoch_end=stop_after(1))
        done = mpiexec_minivit(2, mixed, command="pretrain", resume=True, epochs=2)
        assert done.returncode == 0, done.stderr
    if method == "mae":
        assert_same_run(tmp_path / "one", mixed, ("loss",))
    else:  # the biases before a batch norm have a gradient of 0 but for rounding, which AdamW
        # turns into steps of up to ~lr·1e-8: such weights stay ~1e-11, and differ by as much
        assert_same_run(tmp_path / "one", mixed, DINO_MEASURES, atol=1e-10)


@needs_mpiexec
def test_three_processes_share_uneven_last_batches(tmp_path):
    """MAE, a global batch of 129 over 3 processes: each epoch's last batch of 19 splits 6/6/7,
    the losses weighed by their shares (dist.share_of_loss) give the one-process weights."""
    options = dict(PRETRAIN, method="mae", batch_size=129, epochs=1)
    pretrain(PretrainConfig(**options, out=str(tmp_path / "one"), progress=False))
    done = mpiexec_minivit(3, tmp_path / "three", command="pretrain", **options)
    assert done.returncode == 0, done.stderr
    assert_same_run(tmp_path / "one", tmp_path / "three", ("loss",))


@needs_mpiexec
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_a_global_batch_that_does_not_split_is_a_clear_error(tmp_path, command):
    options = dict(OPTIONS if command == "train" else PRETRAIN, batch_size=33)
    done = mpiexec_minivit(2, tmp_path / "run", command=command, epochs=1, **options)
    assert done.returncode != 0
    assert "--batch-size is the global batch" in done.stderr, done.stderr
    assert "must be a multiple of 2, got 33" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_one_process_is_rank_0_of_1_and_shards_nothing():
    dist.init()  # no mpiexec here: nothing to join
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.is_main()) == (0, 1, 0, True)
    batch = np.arange(10)
    assert dist.shard(batch) is not None and np.array_equal(dist.shard(batch), batch)
    assert dist.sum_over_ranks(1.5, 3) == (1.5, 3)
    assert dist.rank_seed([7, 2]) == [7, 2]


def test_launched_by_mpiexec_without_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    with pytest.raises(MinivitError, match=r"PMI_SIZE is set.*pip install -e '\.\[dist\]'"):
        dist.init()


@pytest.fixture
def rank_1_of_2(monkeypatch):
    """minivit.distributed as rank 1 of 2 (no MPI: for the code that only reads the numbers)."""
    group = dist._Group()
    group.rank, group.size = 1, 2
    monkeypatch.setattr(dist, "_group", group)
    return group


def test_uneven_shards_weigh_their_gradients_to_the_whole_batch(rank_1_of_2):
    """A last batch of 5 over 2 ranks: parts of 2 and 3 images, whose mean gradients weighted
    by their shares sum to the mean gradient of the 5 (what average() all-reduces)."""
    import minivit.functional as F
    from minivit.models import create_model
    from minivit.optim import SGD

    rng = np.random.default_rng(0)
    images, labels = rng.standard_normal((5, 1, 8, 8)), rng.integers(0, 10, 5)
    model = create_model("vit_digits", drop_path_rate=0.0).to(dtype="float64")
    optimizer = SGD(model.named_parameters())

    def mean_gradient(x, y):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return optimizer.gather_grads().copy()

    summed, parts = 0.0, []
    for rank in (0, 1):
        rank_1_of_2.rank = rank
        x, y = dist.shard(images, labels)
        parts.append(len(y))
        summed = summed + rank_1_of_2.share * mean_gradient(x, y)
    assert parts == [2, 3]
    np.testing.assert_allclose(summed, mean_gradient(images, labels), rtol=1e-10, atol=1e-14)


def test_batches_that_do_not_split_over_the_ranks_are_clear_errors(rank_1_of_2):
    with pytest.raises(MinivitError, match="must be a multiple of 2, got 33"):
        dist.check_batch_size(33, 1438)
    with pytest.raises(MinivitError, match="last batch of each epoch holds 1 of the 129"):
        dist.check_batch_size(64, 129)
    dist.check_batch_size(64, 130)  # a last batch of 2: one image each
    with pytest.raises(MinivitError, match="a batch of 1 cannot be shared by 2 processes"):
        dist.shard(np.zeros(1))
    assert dist.rank_seed([7, 2]) == [7, 2, 1]  # each rank its own dropout numbers


def test_share_of_loss_moves_the_weight_before_backward(rank_1_of_2):
    """A last batch of 5: rank 1's rows 2-4 weigh 3/5, in its loss instead of its gradient,
    which the all-reduce then sums (DINO's synchronised batch norm needs the loss weighed)."""
    assert dist.shard_rows(5) == slice(2, 5) and rank_1_of_2.share == 0.6
    assert dist.share_of_loss(2.0) == pytest.approx(1.2)
    assert rank_1_of_2.share == 1.0
