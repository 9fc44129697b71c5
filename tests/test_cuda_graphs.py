"""The experimental CUDA-graph capture on a GPU (skipped where CuPy or a GPU is missing): a
forward and backward captured and replayed; a whole training step (ViT, BEiT, Swin) and an
optimizer step recorded and replayed against eager steps; the capture path of each piece
(GEMMs through ctypes, batch addresses from a kernel) run eagerly against the usual path;
minivit train and bench with --cuda-graph.
"""

import numpy as np
import pytest
from helpers_cuda import GPU, TOLERANCE

import minivit
import minivit.functional as F
from minivit import Tensor, cuda
from minivit import backend as mb
from minivit.cuda import capture, gemm
from minivit.cuda import attention as cuda_attention
from minivit.optim import AdamW


@GPU
def test_captured_forward_backward_replays_like_eager(cp):
    """Experimental CUDA graph: LayerNorm + GELU + soft-target cross-entropy, forward and
    backward, captured once and replayed on new inputs, equal to running it eagerly."""
    rng = np.random.default_rng(8)
    w = Tensor(cp.asarray(rng.standard_normal(48), cp.float32), requires_grad=True)
    b = Tensor(cp.asarray(rng.standard_normal(48), cp.float32), requires_grad=True)

    def step(x, target):
        w.grad = b.grad = None
        loss = F.cross_entropy(F.gelu(F.layer_norm(Tensor(x), w, b)), target)
        loss.backward()
        return loss.data, w.grad, b.grad

    def batch(seed):
        r = np.random.default_rng(seed)
        return (cp.asarray(r.standard_normal((16, 48)), cp.float32),
                cp.asarray(r.dirichlet(np.ones(48), 16), cp.float32))

    captured = cuda.capture_step(step, *batch(0))
    for seed in (1, 2):
        x, target = batch(seed)
        replayed = [a.copy() for a in captured(x, target)]
        eager = step(x, target)
        for got, want in zip(replayed, eager):
            np.testing.assert_allclose(mb.to_numpy(got), mb.to_numpy(want), rtol=1e-5, atol=1e-6)


# -- whole-step CUDA graphs: the capture path of GEMMs, attention, AdamW --------------------------
# (written in a session without a GPU: these tests have not run yet)
@pytest.fixture
def capture_path(cp, monkeypatch):
    """Run the code a CUDA graph records, eagerly: minivit.cuda believes a capture is on."""
    monkeypatch.setattr(capture, "capturing", lambda: True)
    gemm.pointer_cache.clear()
    yield
    gemm.pointer_cache.clear()


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("left, right", [("C", "C"), ("C", "T"), ("T", "C"), ("T", "T"),
                                         ("strided", "C")])
def test_direct_cublas_gemm_matches_cupy(cp, capture_path, dtype, left, right):
    rng = np.random.default_rng(11)

    def operand(rows, cols, layout):
        if layout == "T":
            return cp.asarray(rng.standard_normal((cols, rows)), dtype).T
        if layout == "strided":  # every other column: no unit stride, copied first
            return cp.asarray(rng.standard_normal((rows, 2 * cols)), dtype)[:, ::2]
        return cp.asarray(rng.standard_normal((rows, cols)), dtype)

    a, b = operand(37, 19, left), operand(19, 23, right)
    got = cuda.matmul(a, b)
    np.testing.assert_allclose(mb.to_numpy(got), mb.to_numpy(a) @ mb.to_numpy(b),
                               **TOLERANCE[dtype])


@GPU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("queries", [None, 1])
@pytest.mark.parametrize("biased", [False, True])
def test_attention_on_the_capture_path_matches_the_eager_path(cp, monkeypatch, dtype, queries,
                                                              biased):
    """Batch addresses computed by a kernel and GEMMs through ctypes give what the host
    addresses and CuPy's cuBLAS give, also with a (heads, n, N) bias (rows of the queries)."""
    rng = np.random.default_rng(12)
    qkv = cp.asarray(rng.standard_normal((3, 7, 3 * 8)), dtype)
    grad = cp.asarray(rng.standard_normal((3, queries or 7, 8)), dtype)
    bias = cp.asarray(rng.standard_normal((2, 7, 7)), dtype)[:, :queries or 7] if biased else None

    def run():
        gemm.pointer_cache.clear()
        out, probs, lse, _ = cuda_attention.attention_forward(qkv, 2, queries or 7, 0.5,
                                                              bias=bias)
        return (out, probs) + cuda_attention.attention_backward(grad, qkv, None, lse, 2, 0.5,
                                                                bias=bias)

    eager = run()
    monkeypatch.setattr(capture, "capturing", lambda: True)
    monkeypatch.setitem(capture.state, "pointers", {})  # the cache a CapturedStep would give
    captured_path = run()
    for got, want in zip(captured_path, eager):
        np.testing.assert_allclose(mb.to_numpy(got), mb.to_numpy(want), **TOLERANCE[dtype])


@GPU
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_a_captured_optimizer_step_replays_like_eager_steps(cp, max_grad_norm):
    """AdamW alone, recorded with fixed gradients: 3 replays after the warm-up equal 4 eager
    steps exactly (the scalars a replay reads are refilled before it, in memory that no
    temporary of the graph shares: a shared block once overwrote β₁ in every replay)."""
    from minivit.nn import Parameter

    rng = np.random.default_rng(14)
    shapes = [(5, 3), (3,), (4, 7)]
    values = [rng.standard_normal(shape) for shape in shapes]
    grads = [cp.asarray(rng.standard_normal(shape)) for shape in shapes]

    def setup():
        named = [(f"p{i}", Parameter(cp.asarray(value))) for i, value in enumerate(values)]
        for (_, parameter), grad in zip(named, grads):
            parameter.grad = grad
        return AdamW(named, lr=1e-2, weight_decay=0.05)

    eager, graph = setup(), setup()
    for _ in range(4):
        eager.step(max_grad_norm=max_grad_norm)
    captured = cuda.capture_step(lambda: graph.step(max_grad_norm=max_grad_norm))
    for _ in range(3):
        captured()
    assert graph.step_count == eager.step_count == 4
    for name in ("flat", "m", "v"):
        np.testing.assert_allclose(mb.to_numpy(getattr(graph, name)),
                                   mb.to_numpy(getattr(eager, name)), rtol=1e-13, err_msg=name)


# model, its options, image size: a ViT; BEiT and Swin (relative position bias, Swin's shift
# masks), whose fixed index and masks must be on the GPU before the capture, and whose bias
# gradient a capture can hold (a scatter-add of known size, no host sync)
CAPTURED_MODELS = {"vit": ("vit_digits", dict(depth=2), 8),
                   "beit": ("beit_digits", dict(depth=2), 8),
                   "swin": ("swin_digits", {}, 8)}


@GPU
@pytest.mark.parametrize("name", sorted(CAPTURED_MODELS))
def test_a_captured_training_step_replays_like_eager_steps(cp, name):
    """A whole training step (forward, integer-label cross-entropy, backward, AdamW)
    recorded as a CUDA graph: its warm-up and 3 replays equal 4 eager steps, in float64, and
    the optimizer counts every replay as a step."""
    from minivit.models import create_model

    model_name, options, size = CAPTURED_MODELS[name]

    def setup():
        minivit.set_backend("cupy")
        minivit.manual_seed(0)
        model = create_model(model_name, drop_path_rate=0.0, **options)
        model = model.to(backend="cupy", dtype="float64")
        return model, AdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05)

    rng = np.random.default_rng(13)
    images = cp.asarray(rng.standard_normal((16, 1, size, size)))
    labels = cp.asarray(rng.integers(0, 10, 16))

    def step_of(model, optimizer):
        def step():
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(max_grad_norm=1.0)
            return loss.data
        return step

    eager_model, eager_optimizer = setup()
    eager_step = step_of(eager_model, eager_optimizer)
    eager_losses = [float(eager_step()) for _ in range(4)]
    graph_model, graph_optimizer = setup()
    captured = cuda.capture_step(step_of(graph_model, graph_optimizer))  # warm-up: step 1
    graph_losses = []
    for _ in range(3):
        graph_losses.append(float(captured()))
    assert graph_optimizer.step_count == eager_optimizer.step_count == 4
    np.testing.assert_allclose(graph_losses, eager_losses[1:], rtol=1e-10)
    for (name, got), (_, want) in zip(graph_model.named_parameters(),
                                      eager_model.named_parameters()):
        # atol: a parameter whose true gradient is 0 (the key bias: softmax ignores a shift)
        # moves by AdamW's lr·g/ε on rounding noise g, which two GEMM paths round differently
        np.testing.assert_allclose(mb.to_numpy(got.data), mb.to_numpy(want.data), rtol=1e-9,
                                   atol=1e-8, err_msg=name)


@GPU
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_drop_path_in_a_captured_step_draws_new_masks_in_every_replay(cp, dtype):
    """Recorded drop_path: each replay keeps the samples that the host's draws for it say
    (minivit's NumPy generator, seeded by manual_seed; the eager warm-up used CuPy's), scaled
    by 1/(1 − p): new masks every replay, read after the host wrote them."""
    minivit.manual_seed(16)
    ones = Tensor(cp.ones((4000, 3), dtype))
    captured = cuda.capture_step(lambda: F.drop_path(ones, 0.25, training=True).data)
    host = np.random.default_rng(16)
    masks = []
    for _ in range(3):
        out = mb.to_numpy(captured())
        kept = host.random((4000, 1)).astype(dtype) < 0.75
        np.testing.assert_array_equal(out, np.where(kept, dtype(1 / 0.75), 0) * np.ones(3))
        masks.append(kept)
    assert (masks[0] != masks[1]).any() and (masks[1] != masks[2]).any()


def _train_run(tmp_path, name, **overrides):
    """A short digits run on the GPU; returns its metrics records and last weights."""
    import json

    from minivit.io import load_weights
    from minivit.train import TrainConfig, train

    config = dict(dataset="digits", model="vit_digits", epochs=2, warmup=1, batch_size=64,
                  augment=False, progress=False, backend="cupy", out=str(tmp_path / name))
    train(TrainConfig(**dict(config, **overrides)))
    records = [json.loads(line)
               for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return records, load_weights(tmp_path / name / "last.safetensors")[0]


@GPU
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_with_cuda_graphs_equals_eager_training(tmp_path, optimizer):
    """minivit train --cuda-graph: the 22 full batches of 64 of an epoch replay a graph
    recorded on the first, the last 30 images run eagerly, the learning rate follows its
    warm-up schedule in the replays (AdamW's scalars, SGD's rate); in float64 without
    drop-path the metrics and the weights equal an eager run's."""
    common = dict(dtype="float64", drop_path=0.0, optimizer=optimizer, log_grads=True)
    eager_records, eager_weights = _train_run(tmp_path, "eager", **common)
    graph_records, graph_weights = _train_run(tmp_path, "graph", cuda_graph=True, **common)
    assert [r["split"] for r in graph_records] == [r["split"] for r in eager_records]
    for got, want in zip(graph_records, eager_records):
        for key in ("loss", "accuracy", "lr", "step"):
            if key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)
        for key in ("grad_norms", "update_ratios"):
            for layer in want.get(key, {}):
                np.testing.assert_allclose(got[key][layer], want[key][layer], rtol=1e-8,
                                           err_msg=f"{key} {layer}")
    for name, want in eager_weights.items():
        # atol: see test_a_captured_training_step_replays_like_eager_steps (the key bias)
        np.testing.assert_allclose(graph_weights[name], want, rtol=1e-9, atol=1e-8,
                                   err_msg=name)


@GPU
def test_training_with_cuda_graphs_and_drop_path_learns(tmp_path):
    """Drop-path in the recorded step (float32, the default rate 0.2): new masks each replay,
    and the run learns as an eager one does."""
    records, _ = _train_run(tmp_path, "graph", cuda_graph=True, epochs=8)
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    test_accuracy = [r["accuracy"] for r in records if r["split"] == "test"]
    assert all(np.isfinite(train_losses)) and train_losses[-1] < 0.8 * train_losses[0]
    assert test_accuracy[-1] > 0.3  # chance is 0.1


@GPU
def test_bench_with_cuda_graphs_on_a_tiny_config(capsys):
    from minivit.cli import main

    assert main(["bench", "--config", "tiny", "--backend", "cupy", "--cuda-graph", "--steps",
                 "2", "--warmup-steps", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs" in out and "train" in out and "infer" in out
