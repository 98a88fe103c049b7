"""Appendix A: the PyTorch this book uses.

Tensors and broadcasting, autograd, random generators, modules and parameters, custom
backward passes, gradcheck and optimizers: each in a few lines, each checked against
PyTorch itself in tests/test_ch00_pytorch.py.

Needs: nothing else from the book.
"""

# --8<-- [start:imports]
import torch
from torch import nn
# --8<-- [end:imports]


# ---------------------------------------------------------------------------------------
# Broadcasting
# ---------------------------------------------------------------------------------------

# --8<-- [start:exercise-1]
# Exercise 1: pairwise squared distances by broadcasting
def pairwise_sq_distances(x, y):
    """Squared Euclidean distances between the rows of x (N, D) and the rows of y (M, D),
    as an (N, M) tensor: entry (i, j) is sum over d of (x[i, d] - y[j, d]) ** 2.

    No Python loop: index with None to view x as (N, 1, D) and y as (1, M, D); their
    difference broadcasts to (N, M, D). Raise ValueError unless x and y are 2-D with the
    same number of columns.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"expected x (N, D) and y (M, D), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    diff = x[:, None, :] - y[None, :, :]  # (N, 1, D) - (1, M, D) -> (N, M, D)
    return (diff**2).sum(dim=-1)  # (N, M)
# --8<-- [end:exercise-1]


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------

# --8<-- [start:exercise-2]
# Exercise 2: a gradient with autograd
def gradient(f, x):
    """The gradient of the number f(x) with respect to the tensor x: a tensor shaped like x.

    Differentiate a detached copy of x that requires grad, so that the caller's x gets no
    .grad and no graph; the result is a plain tensor (it does not require grad). Raise
    ValueError when f(x) is not a single number.
    """
    x = x.detach().requires_grad_(True)  # a new leaf of the graph, sharing x's memory
    y = f(x)
    if y.numel() != 1:
        raise ValueError(f"f must return a single number, got shape {tuple(y.shape)}")
    y.backward()  # fills x.grad with dy/dx
    return x.grad
# --8<-- [end:exercise-2]


# ---------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------

# --8<-- [start:noisy-line]
def noisy_line(n, slope, intercept, noise, generator=None):
    """n points of y = slope * x + intercept + noise * N(0, 1), x uniform in [-2, 2):
    x (n, 1), y (n, 1). The same seeded generator gives the same points."""
    x = torch.rand(n, 1, generator=generator) * 4 - 2
    y = slope * x + intercept + noise * torch.randn(n, 1, generator=generator)
    return x, y
# --8<-- [end:noisy-line]


# ---------------------------------------------------------------------------------------
# Modules and parameters
# ---------------------------------------------------------------------------------------

# --8<-- [start:affine]
class Affine(nn.Module):
    """y = x W^T + b, what nn.Linear computes. Assigning an nn.Parameter to an attribute
    registers it: it appears in parameters() and state_dict(), and optimizers update it."""

    def __init__(self, n_in, n_out, generator=None):
        super().__init__()
        bound = 1 / n_in**0.5  # nn.Linear's initial range
        self.weight = nn.Parameter(
            torch.empty(n_out, n_in).uniform_(-bound, bound, generator=generator)
        )
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight.T + self.bias  # (..., n_in) @ (n_in, n_out) -> (..., n_out)
# --8<-- [end:affine]


# ---------------------------------------------------------------------------------------
# A custom backward pass
# ---------------------------------------------------------------------------------------

# --8<-- [start:sigmoid]
class Sigmoid(torch.autograd.Function):
    """sigmoid(x) = 1 / (1 + exp(-x)) with a hand-written backward pass.

    Call it as Sigmoid.apply(x). forward computes the output and saves on ctx what backward
    needs; backward receives dL/dy and returns dL/dx, one gradient per input of forward.
    """

    @staticmethod
    def forward(ctx, x):
        y = 1 / (1 + torch.exp(-x))
        ctx.save_for_backward(y)  # the derivative needs only the output
        return y
    # --8<-- [end:sigmoid]

    # --8<-- [start:exercise-3]
    # Exercise 3: the backward pass of sigmoid
    @staticmethod
    def backward(ctx, grad_out):
        """dL/dx from dL/dy = grad_out: sigmoid'(x) = y (1 - y), y the output that forward
        saved (ctx.saved_tensors)."""
        (y,) = ctx.saved_tensors
        return grad_out * y * (1 - y)
    # --8<-- [end:exercise-3]


# ---------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------

# --8<-- [start:fit]
def fit(model, x, y, steps=200, lr=0.1):
    """Fit model to (x, y) by gradient descent on the mean squared error; returns the last
    loss. The loop every training of the book runs: forward, zero_grad, backward, step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()  # backward() adds into .grad: clear the last step's
        loss.backward()
        optimizer.step()  # p -= lr * p.grad, for every parameter
    return loss.item()
# --8<-- [end:fit]
