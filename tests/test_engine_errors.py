"""The autograd engine's error messages (expected vs got), dtypes (constants never promote,
tensors never mix), small numeric edge cases and conversions to Python values.
"""

import numpy as np
import pytest
from conftest import as_host, leaf, on_backend

import minivit.functional as F
from minivit import Tensor
from minivit.errors import BackendError, DTypeError, GraphError, MinivitError, ShapeError


# -- error messages: expected vs got ------------------------------------------------------------
def test_linear_shape_mismatch_names_both_shapes(backend):
    with pytest.raises(ShapeError, match=r"got input \(2, 3\) and weight \(4, 5\)"):
        F.linear(leaf(np.ones((2, 3))), leaf(np.ones((4, 5))))
    with pytest.raises(ShapeError, match=r"bias must have shape \(4,\), got \(3,\)"):
        F.linear(leaf(np.ones((2, 5))), leaf(np.ones((4, 5))), leaf(np.ones(3)))


def test_patchify_errors(backend):
    weight = leaf(np.ones((8, 3, 4, 4)))
    with pytest.raises(ShapeError, match=r"image size 30x32 is not a multiple of the patch size 4"):
        F.patchify(leaf(np.ones((1, 3, 30, 32))), weight, None, patch_size=4)
    with pytest.raises(ShapeError, match=r"weight must be \(D, 1, 4, 4\).*got \(8, 3, 4, 4\)"):
        F.patchify(leaf(np.ones((1, 1, 32, 32))), weight, None, patch_size=4)
    with pytest.raises(ShapeError,
                       match=r"expected images \(B, C, H, W\), got shape \(3, 32, 32\)"):
        F.patchify(leaf(np.ones((3, 32, 32))), weight, None, patch_size=4)


def test_attention_shape_mismatch_names_q_k_v(backend):
    q = leaf(np.ones((1, 2, 3, 4)))
    with pytest.raises(ShapeError,
                       match=r"got q \(1, 2, 3, 4\), k \(1, 2, 3, 5\), v \(1, 2, 3, 4\)"):
        F.scaled_dot_product_attention(q, leaf(np.ones((1, 2, 3, 5))), q)
    with pytest.raises(ShapeError, match=r"v \(1, 2, 6, 4\)"):
        F.scaled_dot_product_attention(q, q, leaf(np.ones((1, 2, 6, 4))))
    with pytest.raises(ShapeError, match=r"\(B, heads, N, d\)"):
        F.scaled_dot_product_attention(*(leaf(np.ones((2, 3, 4))),) * 3)


def test_cross_entropy_errors(backend):
    logits = leaf(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\] for 5 classes; "
                                         r"got values from 0 to 5"):
        F.cross_entropy(logits, on_backend([0, 5, 2]))
    with pytest.raises(ValueError, match=r"got values from -1 to 2"):
        F.cross_entropy(logits, on_backend([-1, 0, 2]))
    with pytest.raises(ShapeError, match=r"labels must have shape \(3,\).*got \(2,\)"):
        F.cross_entropy(logits, on_backend([0, 1]))
    with pytest.raises(ShapeError, match=r"soft targets must have the logits' shape \(3, 5\); "
                                         r"got \(3, 4\)"):
        F.cross_entropy(logits, on_backend(np.ones((3, 4))))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        F.cross_entropy(logits, on_backend([0, 1, 2]), label_smoothing=1.0)


def test_layer_norm_and_matmul_shape_errors(backend):
    with pytest.raises(ShapeError, match=r"weight must have shape \(4,\).*got \(3,\)"):
        F.layer_norm(leaf(np.ones((2, 4))), leaf(np.ones(3)))
    with pytest.raises(ShapeError, match=r"got \(2, 3\) @ \(4, 2\)"):
        leaf(np.ones((2, 3))) @ leaf(np.ones((4, 2)))


# -- dtypes: constants never promote, tensors never mix --------------------------------------------
@pytest.mark.parametrize("constant", [np.arange(3), np.ones(3), [1.0, 2.0, 3.0]])
def test_a_constant_keeps_the_tensors_dtype_forward_and_backward(backend, constant):
    x = Tensor(on_backend(np.ones((2, 3)), np.float32), requires_grad=True)
    raw = constant if isinstance(constant, list) else on_backend(constant)
    for y in (x * raw, raw * x, x + raw, x - raw, raw / (x + 1), x @ on_backend(np.ones((3, 2)))):
        assert y.dtype == np.float32
    (x * raw).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(as_host(x.grad), np.broadcast_to(np.asarray(constant), (2, 3)))


def test_tensors_of_two_float_dtypes_in_one_op_are_a_clear_error(backend):
    x32 = Tensor(on_backend(np.ones(3), np.float32), requires_grad=True)
    x64 = Tensor(on_backend(np.ones(3)))
    with pytest.raises(DTypeError, match=r"add: inputs of different dtypes \(float32, float64\)"):
        x32 + x64
    weight = Tensor(on_backend(np.ones((2, 3)), np.float32), requires_grad=True)
    with pytest.raises(DTypeError, match="linear: inputs of different dtypes"):
        F.linear(x64, weight)


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(DTypeError, match="only floating-point tensors can require gradients"):
        Tensor(np.array([1, 2, 3]), requires_grad=True)
    Tensor(np.array([1, 2, 3]))  # without gradients they are fine


def test_small_numeric_edge_cases(backend):
    assert float(Tensor(on_backend(np.array([1, 2]))).mean()) == 1.5  # not truncated to 1
    x = Tensor(on_backend(np.array([0.0, 4.0])), requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(as_host(x.grad), [0.0, 0.0])  # not NaN at 0
    t = Tensor(on_backend(np.array([1.0, 3.0])), requires_grad=True)
    y = 2 ** t
    y.sum().backward()
    np.testing.assert_allclose(as_host(y.data), [2.0, 8.0])
    np.testing.assert_allclose(as_host(t.grad), [2.0 * np.log(2), 8.0 * np.log(2)])
    np.testing.assert_allclose(as_host((np.float32(2) ** t).data), [2.0, 8.0])
    with pytest.raises(ValueError, match="needs a base > 0"):
        0 ** t
    # an array of exponents, one of them 0 at a = 0: slopes 0, 1, 3a²
    a = Tensor(on_backend(np.array([0.0, 2.0, 3.0])), requires_grad=True)
    (a ** on_backend(np.array([0.0, 1.0, 3.0]))).sum().backward()
    np.testing.assert_array_equal(as_host(a.grad), [0.0, 1.0, 27.0])
    assert t.to(dtype="int32").requires_grad is False  # integers carry no gradient


def test_one_element_tensors_convert_to_python_values():
    assert bool(Tensor(np.zeros(1))) is False and bool(Tensor(2.0)) is True
    assert float(Tensor([2.5])) == 2.5 and int(Tensor(3.0)) == 3
    with pytest.raises(TypeError, match="only a one-element tensor converts"):
        bool(Tensor([1.0, 2.0]))


def test_cross_entropy_takes_a_list_of_labels(backend):
    logits = Tensor(on_backend(np.random.default_rng(0).standard_normal((4, 5)), np.float32),
                    requires_grad=True)
    from_list = F.cross_entropy(logits, [0, 4, 2, 1])
    from_array = F.cross_entropy(logits, on_backend(np.array([0, 4, 2, 1])))
    assert float(from_list) == float(from_array)


def test_errors_are_minivit_errors():
    assert issubclass(ShapeError, MinivitError) and issubclass(ShapeError, ValueError)
    assert issubclass(BackendError, MinivitError) and issubclass(GraphError, MinivitError)
