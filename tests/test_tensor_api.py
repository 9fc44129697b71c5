"""The Tensor API a PyTorch user reaches for in the first hour: comparisons, argmax, softmax as a
method, view/permute, clone, requires_grad_, numel, tolist, the constructors, dim= aliases,
.to() device names, and minivit.save / minivit.load."""

import numpy as np
import pytest
from conftest import as_host, on_backend

import minivit
from minivit import Tensor
from minivit.errors import BackendError, DTypeError, GraphError
from minivit.models import create_model, model_from_checkpoint


def test_comparisons_give_boolean_tensors_outside_the_graph(backend):
    x = Tensor(on_backend([[-1.0, 0.0], [2.0, 3.0]]), requires_grad=True)
    np.testing.assert_array_equal(as_host((x > 0).data), [[False, False], [True, True]])
    np.testing.assert_array_equal(as_host((x >= 0).data), [[False, True], [True, True]])
    np.testing.assert_array_equal(as_host((x < 2).data), [[True, True], [False, False]])
    np.testing.assert_array_equal(as_host((x <= 2).data), [[True, True], [True, False]])
    np.testing.assert_array_equal(as_host((x == x).data), np.ones((2, 2), bool))
    np.testing.assert_array_equal(as_host((x != Tensor(on_backend([[0.0, 0.0], [2.0, 0.0]])))
                                          .data), [[True, False], [False, True]])
    np.testing.assert_array_equal(as_host((on_backend([0.0, 9.0]) < x[1]).data), [True, False])
    assert not (x > 0).requires_grad and (x > 0).dtype == bool
    assert (x == None) is False and (x != "x") is True  # noqa: E711 - what a user may write
    assert x in [x] and {x: 1}[x] == 1  # tensors still hash by identity
    with pytest.raises(TypeError):
        x < None  # noqa: B015


def test_argmax_softmax_and_reductions_take_dim(backend):
    x = Tensor(on_backend([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]]))
    assert x.argmax().item() == 3
    np.testing.assert_array_equal(as_host(x.argmax(dim=1).data), [1, 0])
    assert x.argmax(axis=0, keepdims=True).shape == (1, 3)
    assert x.argmax(keepdim=True).shape == (1, 1)
    np.testing.assert_array_equal(as_host(x.max(dim=0).data), [7.0, 5.0, 3.0])
    assert x.sum(dim=1, keepdim=True).shape == (2, 1) and x.mean(dim=0).shape == (3,)
    probabilities = as_host(x.softmax(dim=1).data)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(as_host(x.softmax().data), probabilities)
    np.testing.assert_allclose(np.exp(as_host(x.log_softmax(dim=-1).data)), probabilities,
                               rtol=1e-6)
    with pytest.raises(TypeError, match="axis or dim"):
        x.sum(axis=0, dim=1)


def test_functional_softmax_takes_dim_as_the_methods_do(backend):
    import minivit.functional as F

    x = Tensor(on_backend([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]]))
    np.testing.assert_array_equal(as_host(F.softmax(x, dim=0).data), as_host(x.softmax(0).data))
    np.testing.assert_array_equal(as_host(F.log_softmax(x, dim=0).data),
                                  as_host(F.log_softmax(x, 0).data))
    assert not np.allclose(as_host(F.softmax(x, dim=0).data), as_host(F.softmax(x).data))
    with pytest.raises(TypeError, match="axis or dim"):
        F.log_softmax(x, 0, dim=1)


def test_view_permute_numel_tolist(backend):
    x = Tensor(on_backend(np.arange(6.0).reshape(2, 3)), requires_grad=True)
    assert x.view(3, 2).shape == (3, 2) and x.view(-1).shape == (6,)
    assert x.permute(1, 0).shape == (3, 2)
    x.view(6).permute(0).sum().backward()
    np.testing.assert_array_equal(as_host(x.grad), np.ones((2, 3)))
    assert x.numel() == 6
    assert x.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert Tensor(on_backend(2.5)).tolist() == 2.5


def test_requires_grad_in_place(backend):
    x = Tensor(on_backend([1.0, 2.0]))
    assert x.requires_grad_() is x and x.requires_grad
    (x * x).sum().backward()
    np.testing.assert_array_equal(as_host(x.grad), [2.0, 4.0])
    assert not x.requires_grad_(False).requires_grad
    with pytest.raises(GraphError, match="only a leaf"):
        (Tensor(on_backend([1.0]), requires_grad=True) * 2).requires_grad_(False)
    with pytest.raises(DTypeError, match="floating-point"):
        Tensor(on_backend([1, 2])).requires_grad_()


def test_constructors(backend):
    import minivit.tensor  # noqa: F401 - the import a user may write keeps it callable

    assert minivit.zeros(2, 3).shape == minivit.zeros((2, 3)).shape == (2, 3)
    assert minivit.ones(4, dtype="float64").dtype == np.float64
    assert as_host(minivit.ones(2).data).tolist() == [1.0, 1.0]
    assert minivit.zeros(2).backend == backend and minivit.zeros(2).dtype == np.float32
    minivit.manual_seed(5)
    first = minivit.randn(3, 4, requires_grad=True)
    minivit.manual_seed(5)
    assert first.requires_grad and first.dtype == np.float32 and first.shape == (3, 4)
    np.testing.assert_array_equal(as_host(minivit.randn(3, 4).data), as_host(first.data))
    floats, ints = minivit.tensor([[1.0, 2.0]]), minivit.tensor([1, 2])
    assert floats.dtype == np.float32 and ints.dtype == np.int64 and floats.backend == backend
    source = np.array([1.0, 2.0])
    copied = minivit.tensor(source, requires_grad=True)
    source[0] = 9.0  # a copy, as torch.tensor makes
    assert copied.dtype == np.float64 and copied.tolist() == [1.0, 2.0] and copied.requires_grad
    assert minivit.tensor(copied, dtype="float32").dtype == np.float32
    # minivit.tensor is also still the module of Tensor, Function and the engine's hook
    assert minivit.tensor.Tensor is Tensor and minivit.tensor.op_hook is minivit.autograd.op_hook


@pytest.mark.parametrize("name", ["numpy", "cpu", "CPU"])
def test_to_accepts_the_names_of_the_cpu(name):
    t = Tensor([1.0])
    assert t.to(name).backend == "numpy"
    model = create_model("vit_digits", num_classes=3)
    assert model.to(name).parameters()[0].backend == "numpy"


@pytest.mark.parametrize("name", ["cuda", "gpu", "cupy"])
def test_to_a_gpu_name_asks_for_cupy(name, monkeypatch):
    from minivit import backend

    asked = []
    monkeypatch.setattr(backend, "_import_cupy", lambda: asked.append(name) or
                        (_ for _ in ()).throw(BackendError("no CuPy here")))
    with pytest.raises(BackendError, match="no CuPy"):
        Tensor([1.0]).to(name)
    assert asked == [name]


def test_to_refuses_other_names_naming_the_choices():
    for bad in ("tpu", "cuda:0", "mps"):
        with pytest.raises(BackendError, match=f"unknown backend '{bad}': expected numpy or cpu "
                                               r"\(the CPU\), or cupy, cuda or gpu"):
            Tensor([1.0]).to(bad)
        with pytest.raises(BackendError, match="unknown backend"):
            create_model("vit_digits", num_classes=3).to(bad)


def test_save_and_load_a_model_or_a_dict(tmp_path):
    model = create_model("vit_digits", num_classes=3)
    minivit.save(model, tmp_path / "model.safetensors")
    other = create_model("vit_digits", num_classes=3)
    other.load_state_dict(minivit.load(tmp_path / "model.safetensors"))
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    minivit.save({"w": Tensor([1.0, 2.0]), "n": np.arange(3)}, tmp_path / "d.npz")
    loaded = minivit.load(tmp_path / "d.npz")
    assert loaded["w"].tolist() == [1.0, 2.0] and loaded["n"].tolist() == [0, 1, 2]


def test_load_of_a_run_gives_its_models_weights(tmp_path):
    from minivit.train import TrainConfig, train

    train(TrainConfig(dataset="digits", epochs=1, warmup=0, batch_size=256, augment=False,
                      ema=0.9, progress=False, out=str(tmp_path / "run")))
    model, info = model_from_checkpoint(tmp_path / "run")
    state = minivit.load(tmp_path / "run")
    assert not any(name.startswith(("optimizer.", "ema.")) for name in state)
    assert sorted(state) == sorted(model.state_dict())
    model.load_state_dict(state)  # an --ema run's average stays out
    assert not any(k.startswith("optimizer.") for k in minivit.load(tmp_path / "run" /
                                                                    "last.safetensors"))
