"""Tests for minivit.io: weight files, atomic writes and wrapper prefixes."""

import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivit.errors import WeightsError
from minivit.io import (
    atomic_write,
    load_weights,
    save_weights,
    strip_prefixes,
)


def small_state(rng=None):
    rng = rng or np.random.default_rng(0)
    return {
        "cls_token": rng.standard_normal((1, 1, 4)).astype(np.float32),
        "pos_embed": rng.standard_normal((1, 5, 4)),  # float64
        "patch_embed.proj.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
        "steps": np.array([1, -2, 2**40], dtype=np.int64),
        "scalar": np.array(3.5),
        "file": np.arange(3, dtype=np.float32),  # would clash with np.savez's own argument
    }


def expected_of(state):
    return {k: v.shape for k, v in state.items()}


def assert_same(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_is_bit_exact_with_metadata(tmp_path, suffix):
    state = small_state()
    path = tmp_path / f"w{suffix}"
    save_weights(state, path, metadata={"arch": "vit_tiny", "epoch": "3"})
    loaded, metadata = load_weights(path)
    assert_same(state, loaded)
    assert metadata == {"arch": "vit_tiny", "epoch": "3"}
    assert all(v.flags.writeable and v.flags.c_contiguous for v in loaded.values())


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_without_metadata_and_non_contiguous(tmp_path, suffix):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / f"w{suffix}"
    save_weights({"t": a.T, "s": a[:, ::2]}, path)
    loaded, metadata = load_weights(path)
    assert metadata == {}
    np.testing.assert_array_equal(loaded["t"], a.T)
    np.testing.assert_array_equal(loaded["s"], a[:, ::2])


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    dtype=st.sampled_from([np.float32, np.float64, np.int64]),
    suffix=st.sampled_from([".safetensors", ".npz"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(tmp_path_factory, shape, dtype, suffix, seed):
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 1e6).astype(dtype)
    path = tmp_path_factory.mktemp("rt") / f"w{suffix}"
    save_weights({"x": array}, path)
    assert_same({"x": array}, load_weights(path)[0])


def test_save_takes_arrays_with_get_like_cupy(tmp_path):
    class FakeDeviceArray:
        def get(self):
            return np.ones((2, 2), np.float32)

    save_weights({"w": FakeDeviceArray()}, tmp_path / "w.npz")
    np.testing.assert_array_equal(load_weights(tmp_path / "w.npz")[0]["w"], np.ones((2, 2)))


def test_safetensors_half_precision_becomes_float32(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    values = torch.tensor([[1.5, -2.25], [3.0e4, 1e-3]])
    save_file({"b": values.bfloat16(), "h": values.half()}, str(tmp_path / "w.safetensors"))
    state, _ = load_weights(tmp_path / "w.safetensors")
    assert state["b"].dtype == state["h"].dtype == np.float32
    np.testing.assert_array_equal(state["b"], values.bfloat16().float().numpy())
    np.testing.assert_array_equal(state["h"], values.half().float().numpy())


def test_save_rejects_bad_suffix_metadata_and_reserved_name(tmp_path):
    with pytest.raises(WeightsError, match=r"w\.pth.*unsupported suffix.*\.safetensors, \.npz"):
        save_weights({"x": np.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="metadata must map str to str"):
        save_weights({"x": np.zeros(1)}, tmp_path / "w.npz", metadata={"epoch": 3})
    with pytest.raises(WeightsError, match="reserved"):
        save_weights({"__metadata__": np.zeros(1)}, tmp_path / "w.npz")
    with pytest.raises(WeightsError, match="cannot write .*missing"):
        save_weights({"x": np.zeros(1)}, tmp_path / "missing" / "w.npz")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_saving_safetensors_is_a_weights_error(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own SafetensorError, not OSError."""
    import safetensors.numpy
    from safetensors import SafetensorError

    path = tmp_path / "w.safetensors"
    save_weights({"x": np.arange(3.0)}, path)
    before = path.read_bytes()

    def disk_full(arrays, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(WeightsError, match=r"cannot write .*w\.safetensors: .*No space left on "
                                           r"device.*has room"):
        save_weights({"x": np.zeros(3)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]


# ------------------------------------------------------------------ atomic_write


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_weights({"x": np.arange(100.0)}, path)
    before = path.read_bytes()

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(before[: len(before) // 2])
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_saved_weights_get_the_umasks_permissions(tmp_path, suffix):
    """safetensors' writer creates its file 0600; the saved file follows the umask like the
    other formats."""
    previous = os.umask(0o022)
    try:
        path = tmp_path / f"w{suffix}"
        save_weights({"w": np.zeros(3, np.float32)}, path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_write_interrupt_removes_temp_file(tmp_path):
    def interrupted(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", interrupted)
    assert os.listdir(tmp_path) == []


def test_atomic_write_temp_path_keeps_suffix_for_np_savez(tmp_path):
    path = tmp_path / "arrays.npz"
    atomic_write(path, lambda tmp: np.savez(tmp, a=np.arange(3)))
    assert os.listdir(tmp_path) == ["arrays.npz"]
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["a"], np.arange(3))


# ------------------------------------------------------------------ PyTorch files


def test_pth_round_trip_unwraps_containers_and_prefix(tmp_path):
    torch = pytest.importorskip("torch")
    state = small_state()
    inner = {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}
    wrapped = {"epoch": 3, "state_dict": inner}
    wrapped["state_dict"]["module.half"] = torch.ones(2, dtype=torch.bfloat16)
    torch.save(wrapped, tmp_path / "w.pth")
    loaded, metadata = load_weights(tmp_path / "w.pth")
    assert metadata == {}
    assert loaded.pop("half").dtype == np.float32
    assert_same(state, loaded)


@pytest.mark.parametrize("container", ["model", "model_state"])
def test_pth_other_containers(tmp_path, container):
    torch = pytest.importorskip("torch")
    torch.save({container: {"w": torch.zeros(2)}, "optimizer": {}}, tmp_path / "w.pt")
    assert list(load_weights(tmp_path / "w.pt")[0]) == ["w"]


def test_pth_with_non_tensor_entries_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp_path / "w.bin")
    with pytest.raises(WeightsError, match=r"w\.bin.*\['epoch'\] are not tensors"):
        load_weights(tmp_path / "w.bin")


def test_pth_training_checkpoint_with_python_objects_is_explained(tmp_path):
    torch = pytest.importorskip("torch")
    import argparse

    checkpoint = {"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1.0)}
    torch.save(checkpoint, tmp_path / "ck.pth")
    with pytest.raises(WeightsError, match="pickled Python objects besides tensors.*safetensors"):
        load_weights(tmp_path / "ck.pth")


def test_pth_without_torch_says_how_to_proceed(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(WeightsError) as info:
        load_weights(tmp_path / "w.pth")
    assert "reading .pth needs PyTorch: pip install 'minivit[parity]'" in str(info.value)
    assert "convert the file to .safetensors elsewhere" in str(info.value)


# ------------------------------------------------------------------ bad files


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pth"])
def test_truncated_and_garbage_files(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    state = {"a": np.ones((64, 64), np.float32), "b": np.zeros(10)}
    if suffix == ".pth":
        torch = pytest.importorskip("torch")
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    else:
        save_weights(state, path)
    cut_in_half(path)
    with pytest.raises(WeightsError, match=f"cannot read {path}"):
        load_weights(path)
    path.write_bytes(os.urandom(1000))
    with pytest.raises(WeightsError, match=f"cannot read {path}"):
        load_weights(path)
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match=f"cannot read {path}"):
        load_weights(path)


def test_truncated_safetensors_says_truncated(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights({"a": np.ones((64, 64), np.float32)}, path)
    cut_in_half(path)
    with pytest.raises(WeightsError, match="truncated: tensor 'a' ends at byte"):
        load_weights(path)


def test_garbage_npz_says_not_zip(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"\x93NUMPY garbage " * 50)
    with pytest.raises(WeightsError, match=r"w\.npz as \.npz: it is not a zip archive"):
        load_weights(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(WeightsError, match=r"nope\.safetensors: no such file"):
        load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match=r"runs/nope: no such file"):  # not 'unsupported suffix'
        load_weights(tmp_path / "runs" / "nope")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"w\.h5: unsupported suffix '\.h5'.*\.pth"):
        load_weights(tmp_path / "w.h5")


# ------------------------------------------------------------------ wrapper prefixes


def test_strip_prefixes():
    assert list(strip_prefixes({"module.model.a": 1, "module.model.b": 2})) == ["a", "b"]
    assert list(strip_prefixes({"model.a": 1, "b": 2})) == ["model.a", "b"]
    assert list(strip_prefixes({"module.a": 1}, ("module.",))) == ["a"]
    assert strip_prefixes({}) == {}
