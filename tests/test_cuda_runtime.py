"""Whole models, TF32 and memory on a GPU (skipped where CuPy or a GPU is missing):
- float32 stays float32 through a whole ViT step, fused kernels equal to the plain cupy path;
- a 2-epoch training run on the GPU whose loss falls;
- set_tf32, memory_info, synchronize and PeakMemory.
"""

import numpy as np
from helpers_cuda import GPU

import minivit
import minivit.functional as F
from minivit import cuda
from minivit import backend as mb


@GPU
def test_fused_and_plain_cupy_paths_agree_on_a_vit_step_in_float32(cp):
    """A whole small ViT, forward and backward in float32: fused kernels against the plain
    CuPy path (fused_kernels(False)) on the same device; every gradient stays float32."""
    from minivit.models import create_model

    def step():
        minivit.set_backend("cupy")
        minivit.manual_seed(0)
        model = create_model("vit_digits", num_classes=10, img_size=8, in_chans=1,
                             drop_path_rate=0.0).to(backend="cupy", dtype="float32")
        images = cp.asarray(np.random.default_rng(6).standard_normal((16, 1, 8, 8)), cp.float32)
        loss = F.cross_entropy(model(images), cp.arange(16) % 10, label_smoothing=0.1)
        loss.backward()
        return loss, dict(model.named_parameters())

    loss, params = step()
    with cuda.fused_kernels(False):
        plain_loss, plain_params = step()
    assert loss.dtype == np.float32
    np.testing.assert_allclose(float(loss.item()), float(plain_loss.item()), rtol=1e-5)
    for name, p in params.items():
        assert p.grad.dtype == np.float32, name
        np.testing.assert_allclose(mb.to_numpy(p.grad), mb.to_numpy(plain_params[name].grad),
                                   rtol=1e-4, atol=1e-5, err_msg=name)


@GPU
def test_two_epochs_of_training_on_the_gpu_lower_the_loss(tmp_path):
    import json

    from minivit.train import TrainConfig, train
    train(TrainConfig(backend="cupy", epochs=2, warmup=0, out=str(tmp_path / "run"),
                      progress=False))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 2 and losses[1] < losses[0], losses


@GPU
def test_tf32_switch(cp):
    before = cuda.tf32_enabled()
    try:
        major = cp.cuda.Device().compute_capability[0]
        assert cuda.set_tf32(True) == (int(major) >= 8)
        a = cp.asarray(np.random.default_rng(7).standard_normal((256, 256)), cp.float32)
        np.testing.assert_allclose(mb.to_numpy(a @ a), mb.to_numpy(a.astype(cp.float64) @ a),
                                   rtol=2e-2, atol=2e-1)  # TF32 keeps a 10-bit mantissa
        assert cuda.set_tf32(False) is False
        assert not cuda.tf32_enabled()
    finally:
        cuda.set_tf32(before)


@GPU
def test_memory_info_and_synchronize(cp):
    keep = cp.zeros(1 << 20, cp.float32)
    cuda.synchronize()
    info = cuda.memory_info()
    assert info["used"] >= keep.nbytes and info["held"] >= info["used"]


@GPU
def test_peak_memory_counts_the_most_bytes_in_use_at_once(cp):
    before = cp.get_default_memory_pool().used_bytes()
    with cuda.PeakMemory() as peak:
        big = cp.empty(8 << 20, cp.uint8)
        del big
        small = cp.empty(4 << 20, cp.uint8)
    assert peak.bytes == before + (8 << 20)
    assert peak.used == before + (4 << 20) == cp.get_default_memory_pool().used_bytes()
    with cuda.PeakMemory():  # the hook was removed on exit: a second one may start
        del small
