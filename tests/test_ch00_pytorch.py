"""Appendix A: the PyTorch primer's functions against PyTorch itself (torch.cdist, autograd,
gradcheck, nn.Linear, torch.linalg.lstsq) and against closed-form derivatives.

Run against your own module with: pytest tests/test_ch00_pytorch.py --impl my_ch00.py
"""

import itertools

import pytest
import torch


@pytest.fixture(scope="module")
def ch(load_chapter):
    return load_chapter("ch00_pytorch")


# ---------------------------------------------------------------------------
# Exercise 1: broadcasting
# ---------------------------------------------------------------------------


@pytest.mark.exercise(1)
@pytest.mark.parametrize("n, m, d", [(1, 1, 1), (5, 4, 3), (7, 2, 16), (3, 9, 1)])
def test_exercise_1_pairwise_sq_distances_matches_cdist_and_a_loop(ch, n, m, d):
    g = torch.Generator().manual_seed(n * 100 + m * 10 + d)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    y = torch.randn(m, d, dtype=torch.float64, generator=g)
    out = ch.pairwise_sq_distances(x, y)
    assert out.shape == (n, m)
    torch.testing.assert_close(out, torch.cdist(x, y) ** 2)
    for i, j in itertools.product(range(n), range(m)):
        assert out[i, j].item() == pytest.approx(sum((x[i, k] - y[j, k]).item() ** 2 for k in range(d)))


@pytest.mark.exercise(1)
@pytest.mark.parametrize("x_shape, y_shape", [((3, 2), (4, 3)), ((3,), (4, 3)), ((2, 3, 2), (4, 2))])
def test_exercise_1_pairwise_sq_distances_rejects_bad_shapes(ch, x_shape, y_shape):
    with pytest.raises(ValueError, match="expected x"):
        ch.pairwise_sq_distances(torch.zeros(x_shape), torch.zeros(y_shape))


# ---------------------------------------------------------------------------
# Exercise 2: autograd
# ---------------------------------------------------------------------------


@pytest.mark.exercise(2)
@pytest.mark.parametrize(
    "f, derivative",
    [
        (lambda t: t.sin().sum(), lambda t: t.cos()),
        (lambda t: (t**3).sum(), lambda t: 3 * t**2),
        (lambda t: t.exp().sum().log(), lambda t: t.exp() / t.exp().sum()),  # softmax
        (lambda t: (t[:, None] * t[None, :]).sum(), lambda t: 2 * t.sum() * torch.ones_like(t)),
    ],
    ids=["sin", "cube", "logsumexp", "outer-product"],
)
def test_exercise_2_gradient_matches_closed_form(ch, f, derivative):
    x = torch.linspace(-1.5, 2.0, 6, dtype=torch.float64)
    torch.testing.assert_close(ch.gradient(f, x), derivative(x))


@pytest.mark.exercise(2)
def test_exercise_2_gradient_leaves_the_callers_tensor_alone(ch):
    x = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    g = ch.gradient(lambda t: (t**2).sum(), x)
    torch.testing.assert_close(g, 2 * x.detach())
    assert x.grad is None, "the caller's tensor got a .grad"
    assert not g.requires_grad, "the result should be a plain tensor, outside any graph"
    y = torch.tensor([3.0, 4.0])  # a tensor that does not require grad works too
    torch.testing.assert_close(ch.gradient(lambda t: t.norm(), y), y / 5)
    assert not y.requires_grad


@pytest.mark.exercise(2)
def test_exercise_2_gradient_needs_a_single_number(ch):
    with pytest.raises(ValueError, match="single number"):
        ch.gradient(lambda t: t * 2, torch.ones(3))


# ---------------------------------------------------------------------------
# Exercise 3: autograd.Function
# ---------------------------------------------------------------------------


def test_sigmoid_forward_matches_torch(ch):
    x = torch.linspace(-30, 30, 101, dtype=torch.float64)
    torch.testing.assert_close(ch.Sigmoid.apply(x), torch.sigmoid(x))


@pytest.mark.exercise(3)
def test_exercise_3_sigmoid_backward_passes_gradcheck(ch):
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(4, 5, dtype=torch.float64, generator=g)).requires_grad_(True)
    assert torch.autograd.gradcheck(ch.Sigmoid.apply, (x,))


@pytest.mark.exercise(3)
def test_exercise_3_sigmoid_backward_matches_autograd(ch):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, generator=g, requires_grad=True)
    weights = torch.randn(50, generator=g)  # a grad_out that is not all ones
    (ch.Sigmoid.apply(x) * weights).sum().backward()
    ours, x.grad = x.grad, None
    (torch.sigmoid(x) * weights).sum().backward()
    torch.testing.assert_close(ours, x.grad)


# ---------------------------------------------------------------------------
# Generators, modules, optimizers
# ---------------------------------------------------------------------------


def test_noisy_line_is_reproducible_and_independent_of_the_global_generator(ch):
    torch.manual_seed(0)
    a = ch.noisy_line(50, 2.0, 1.0, 0.1, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)
    torch.randn(10)
    b = ch.noisy_line(50, 2.0, 1.0, 0.1, generator=torch.Generator().manual_seed(7))
    c = ch.noisy_line(50, 2.0, 1.0, 0.1, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    x, y = a
    assert x.shape == y.shape == (50, 1)
    assert x.min() >= -2 and x.max() < 2
    assert (y - (2 * x + 1)).abs().max() < 0.1 * 5  # noise of standard deviation 0.1


def test_affine_equals_nn_linear_with_the_same_state_dict(ch):
    layer = ch.Affine(4, 3, generator=torch.Generator().manual_seed(0))
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(layer(x), reference(x))
    bound = 1 / 4**0.5
    assert layer.weight.abs().max() <= bound


def test_fit_reaches_the_least_squares_line(ch):
    x, y = ch.noisy_line(200, -1.5, 0.7, 0.3, generator=torch.Generator().manual_seed(1))
    model = ch.Affine(1, 1, generator=torch.Generator().manual_seed(2))
    loss = ch.fit(model, x, y, steps=300, lr=0.1)
    design = torch.cat([x, torch.ones_like(x)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution.flatten()
    torch.testing.assert_close(model.weight.detach().flatten(), solution[:1], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.bias.detach(), solution[1:], atol=1e-4, rtol=0)
    best = ((design @ solution[:, None] - y) ** 2).mean().item()
    assert loss == pytest.approx(best, rel=1e-3)
