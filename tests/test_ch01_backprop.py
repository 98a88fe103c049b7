"""Chapter 1: every gradient of the chapter against torch.autograd, finite differences
and gradcheck.

Run against your own module with: pytest tests/test_ch01_backprop.py --impl my_ch01.py
"""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch01_backprop")


small_floats = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False)


def torch_scalars(*values):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]


# ---------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------


def test_numerical_derivative_matches_calculus(ch):
    # d/dx sin(x) = cos(x); the central difference's error is O(h^2).
    for x in [-1.3, 0.0, 0.7, 2.5]:
        assert ch.numerical_derivative(math.sin, x) == pytest.approx(math.cos(x), abs=1e-8)


# ---------------------------------------------------------------------------
# The Value engine against torch.autograd
# ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(a=small_floats, b=small_floats, c=st.floats(min_value=0.1, max_value=3.0))
def test_value_expression_matches_autograd(ch, a, b, c):
    def expression(x, y, z):  # every operation of the engine, in both orders of operands
        return ((x * y + z) ** 2 - x / z + (y * 0.5).exp() - 2 * y + (z + 1).log() + (x - 1).relu()
                + 3 / z - (1 - x))

    va, vb, vc = ch.Value(a), ch.Value(b), ch.Value(c)
    out = expression(va, vb, vc)
    out.backward()

    ta, tb, tc = torch_scalars(a, b, c)
    ref = expression(ta, tb, tc)
    ref.backward()
    assert out.data == pytest.approx(ref.item(), rel=1e-9, abs=1e-9)
    for value, tensor in [(va, ta), (vb, tb), (vc, tc)]:
        assert value.grad == pytest.approx(tensor.grad.item(), rel=1e-7, abs=1e-9)


def test_gradient_accumulates_when_a_value_is_reused(ch):
    # b = a + a: the two paths must add, db/da = 2 (the classic "+=" bug gives 1).
    a = ch.Value(3.0)
    b = a + a
    b.backward()
    assert a.grad == 2.0
    x = ch.Value(-2.0)
    y = x * x * x  # dy/dx = 3 x^2
    y.backward()
    assert x.grad == pytest.approx(12.0)


def test_backward_visits_each_node_once_in_topological_order(ch):
    # A diamond: d feeds e twice through b and c; a wrong order or a double visit breaks it.
    a = ch.Value(1.5)
    b = a * 2
    c = a.exp()
    e = b * c
    e.backward()
    expected = 2 * math.exp(1.5) + 2 * 1.5 * math.exp(1.5)  # product rule
    assert a.grad == pytest.approx(expected)


def test_log_of_non_positive_is_a_clear_error(ch):
    with pytest.raises(ValueError, match="log"):
        ch.Value(0.0).log()


def test_non_numeric_exponent_is_a_clear_error(ch):
    with pytest.raises(TypeError, match="exponent"):
        ch.Value(2.0) ** ch.Value(3.0)


@pytest.mark.exercise(1)
@settings(max_examples=40, deadline=None)
@given(x=st.floats(min_value=-4, max_value=4))
def test_exercise_1_tanh_matches_autograd(ch, x):
    v = ch.Value(x)
    out = (v * 2).tanh() * 3
    out.backward()
    (t,) = torch_scalars(x)
    ref = (t * 2).tanh() * 3
    ref.backward()
    assert out.data == pytest.approx(ref.item(), abs=1e-12)
    assert v.grad == pytest.approx(t.grad.item(), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------
# The Value network
# ---------------------------------------------------------------------------


def test_value_mlp_gradients_match_autograd(ch):
    model = ch.MLP(3, [4, 4, 1], rng=random.Random(1))
    x = [0.5, -1.0, 2.0]
    out = model(x)
    out.backward()

    # Rebuild the same network with torch from the Value weights.
    params = model.parameters()
    flat = torch.tensor([p.data for p in params], dtype=torch.float64, requires_grad=True)
    i, h = 0, torch.tensor(x, dtype=torch.float64)
    for layer in model.layers:
        n_in, n_out = len(layer.neurons[0].w), len(layer.neurons)
        w_b = flat[i : i + n_out * (n_in + 1)].view(n_out, n_in + 1)
        i += n_out * (n_in + 1)
        h = w_b[:, :n_in] @ h + w_b[:, n_in]
        if layer.neurons[0].nonlinear:
            h = h.tanh()
    h.sum().backward()
    assert out.data == pytest.approx(h.item(), abs=1e-12)
    torch.testing.assert_close(
        torch.tensor([p.grad for p in params], dtype=torch.float64), flat.grad, rtol=1e-9, atol=1e-12
    )


def test_value_mlp_learns_the_moons(ch):
    points, labels = ch.make_moons(40, seed=0)
    model, losses = ch.train_value_mlp(points, labels, steps=60)
    assert losses[0] == pytest.approx(math.log(2), abs=0.2)  # about a coin flip: ln 2
    assert losses[-1] < 0.5 * losses[0]
    correct = sum((model(p).data > 0) == bool(y) for p, y in zip(points.tolist(), labels.tolist()))
    assert correct / len(labels) >= 0.9


# ---------------------------------------------------------------------------
# Tensors and hand-derived gradients
# ---------------------------------------------------------------------------


def test_linear_forward_matches_nn_linear(ch):
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5)
    torch.testing.assert_close(ch.linear_forward(x, layer.weight, layer.bias), layer(x))


def test_linear_forward_rejects_wrong_shapes(ch):
    with pytest.raises(ValueError, match="features"):
        ch.linear_forward(torch.randn(4, 5), torch.randn(3, 6), torch.randn(3))


@pytest.mark.exercise(2)
def test_exercise_2_linear_backward_matches_autograd(ch):
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(6, 3, dtype=torch.float64)
    (x @ w.T + b).backward(grad_out)
    grad_x, grad_w, grad_b = ch.linear_backward(grad_out, x.detach(), w.detach())
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, w.grad)
    torch.testing.assert_close(grad_b, b.grad)


@pytest.mark.exercise(2)
def test_exercise_2_linear_backward_passes_gradcheck(ch):
    torch.manual_seed(1)
    inputs = (
        torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(2, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(ch.LinearFunction.apply, inputs)


def test_softmax_and_cross_entropy_match_torch(ch):
    torch.manual_seed(0)
    logits = torch.randn(8, 5) * 4
    targets = torch.randint(0, 5, (8,))
    torch.testing.assert_close(ch.softmax(logits), torch.softmax(logits, dim=-1))
    torch.testing.assert_close(
        ch.cross_entropy(logits, targets), torch.nn.functional.cross_entropy(logits, targets)
    )


def test_cross_entropy_is_stable_for_huge_logits(ch):
    logits = torch.tensor([[1000.0, 0.0, -1000.0]])
    targets = torch.tensor([1])
    loss = ch.cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets))


def test_cross_entropy_rejects_wrong_shapes(ch):
    with pytest.raises(ValueError, match="targets"):
        ch.cross_entropy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))


@pytest.mark.exercise(3)
def test_exercise_3_cross_entropy_backward_matches_autograd(ch):
    torch.manual_seed(0)
    logits = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 4, (7,))
    torch.nn.functional.cross_entropy(logits, targets).backward()
    torch.testing.assert_close(ch.cross_entropy_backward(logits.detach(), targets), logits.grad)


@pytest.mark.exercise(3)
def test_exercise_3_cross_entropy_backward_passes_gradcheck(ch):
    torch.manual_seed(2)
    logits = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 3, (5,))
    assert torch.autograd.gradcheck(lambda z: ch.CrossEntropyFunction.apply(z, targets), (logits,))


def test_relu_backward_matches_autograd(ch):
    x = torch.tensor([-2.0, -0.5, 0.5, 3.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.relu(x).backward(g)
    torch.testing.assert_close(ch.relu_backward(g, x.detach()), x.grad)


def test_tensor_mlp_backward_matches_autograd(ch):
    points, labels = ch.make_spiral(20)
    model = ch.TensorMLP(2, 16, 3, seed=0)
    grads = model.backward(ch.cross_entropy_backward(model.forward(points), labels))

    params = [p.clone().requires_grad_(True) for p in model.parameters()]
    w1, b1, w2, b2 = params
    logits = torch.relu(points @ w1.T + b1) @ w2.T + b2
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for ours, ref in zip(grads, params):
        torch.testing.assert_close(ours, ref.grad)


def test_tensor_mlp_gradients_match_finite_differences(ch):
    points, labels = ch.make_spiral(5)
    model = ch.TensorMLP(2, 4, 3, seed=0)
    for p in model.parameters():
        p.data = p.data.double()
    points = points.double()
    grads = model.backward(ch.cross_entropy_backward(model.forward(points), labels))
    h = 1e-6
    for param, grad in zip(model.parameters(), grads):
        for index in [0, param.numel() - 1]:
            flat = param.view(-1)
            original = flat[index].item()
            flat[index] = original + h
            up = ch.cross_entropy(model.forward(points), labels).item()
            flat[index] = original - h
            down = ch.cross_entropy(model.forward(points), labels).item()
            flat[index] = original
            assert grad.view(-1)[index].item() == pytest.approx((up - down) / (2 * h), abs=1e-7)


def test_tensor_mlp_learns_the_spiral(ch):
    points, labels = ch.make_spiral(100)
    model, losses = ch.train_tensor_mlp(points, labels)
    assert losses[0] == pytest.approx(math.log(3), abs=0.3)  # about a uniform guess at the start
    assert (model.predict(points) == labels).float().mean() >= 0.97


# ---------------------------------------------------------------------------
# Exercise 4: a gradient checker
# ---------------------------------------------------------------------------


@pytest.mark.exercise(4)
def test_exercise_4_checker_passes_a_correct_backward(ch):
    error = ch.max_gradient_error(lambda v: (v[0] * v[1] + v[1].exp()) ** 2, [0.3, -0.8])
    assert error < 1e-6


@pytest.mark.exercise(4)
def test_exercise_4_checker_finds_a_gradient_bug(ch):
    def buggy_square(v):
        out = ch.Value(v.data**2, (v,), "sq")

        def _backward():
            v.grad += v.data * out.grad  # bug: d(x^2)/dx is 2x, not x

        out._backward = _backward
        return out

    assert ch.max_gradient_error(lambda v: buggy_square(v[0]) + v[1], [1.5, 2.0]) > 0.5
    assert ch.max_gradient_error(lambda v: v[0] ** 2 + v[1], [1.5, 2.0]) < 1e-6
