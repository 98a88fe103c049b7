"""Chapter 1: from derivatives to backpropagation.

A scalar automatic-differentiation engine (``Value``), a small neural network built on it,
and the same network written with tensors and hand-derived matrix gradients. Every
gradient here is checked against torch.autograd, finite differences and gradcheck in the
book's tests.

Depends only on torch and the standard library (matplotlib inside the ``plot_*``
functions, which draw the chapter's figures).

Needs: nothing else from the book.
"""

# --8<-- [start:imports]
import math
import random

import torch
# --8<-- [end:imports]


# ---------------------------------------------------------------------------
# Derivatives by finite differences: the reference we check gradients against
# ---------------------------------------------------------------------------

# --8<-- [start:numerical-derivative]
def numerical_derivative(f, x, h=1e-6):
    """Central difference (f(x+h) - f(x-h)) / 2h; its error shrinks like h**2."""
    return (f(x + h) - f(x - h)) / (2 * h)
# --8<-- [end:numerical-derivative]


# ---------------------------------------------------------------------------
# A scalar autograd engine
# ---------------------------------------------------------------------------

# --8<-- [start:value]
class Value:
    """A scalar that remembers how it was computed, so it can backpropagate."""

    def __init__(self, data, _children=(), _op=""):
        self.data = float(data)
        self.grad = 0.0  # d(output)/d(self), filled in by backward()
        self._backward = lambda: None  # pushes self.grad to the children
        self._prev = set(_children)
        self._op = _op  # for printing the graph

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other), "+")

        def _backward():
            # d(a+b)/da = d(a+b)/db = 1. "+=" because a value may feed several nodes.
            self.grad += out.grad
            other.grad += out.grad

        out._backward = _backward
        return out

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other), "*")

        def _backward():
            self.grad += other.data * out.grad  # d(ab)/da = b
            other.grad += self.data * out.grad  # d(ab)/db = a

        out._backward = _backward
        return out

    def __pow__(self, exponent):
        if not isinstance(exponent, (int, float)):
            raise TypeError("only int or float exponents are supported")
        out = Value(self.data**exponent, (self,), f"**{exponent}")

        def _backward():
            self.grad += exponent * self.data ** (exponent - 1) * out.grad

        out._backward = _backward
        return out

    def exp(self):
        out = Value(math.exp(self.data), (self,), "exp")

        def _backward():
            self.grad += out.data * out.grad  # d(e^x)/dx = e^x, already computed

        out._backward = _backward
        return out

    def log(self):
        if self.data <= 0:
            raise ValueError(f"log of a non-positive number ({self.data})")
        out = Value(math.log(self.data), (self,), "log")

        def _backward():
            self.grad += out.grad / self.data

        out._backward = _backward
        return out

    def relu(self):
        out = Value(max(self.data, 0.0), (self,), "relu")

        def _backward():
            self.grad += (self.data > 0) * out.grad

        out._backward = _backward
        return out

    def backward(self):
        """Fill in .grad of every Value this one depends on (reverse-mode autodiff)."""
        order, seen = [], set()

        def visit(node):  # topological order: children before parents
            if node not in seen:
                seen.add(node)
                for child in node._prev:
                    visit(child)
                order.append(node)

        visit(self)
        self.grad = 1.0  # d(self)/d(self)
        for node in reversed(order):  # each node pushes its gradient once
            node._backward()

    # The rest is arithmetic expressed with the operations above.
    def __neg__(self):
        return self * -1

    def __sub__(self, other):
        return self + (-other)

    def __truediv__(self, other):
        return self * other**-1

    def __radd__(self, other):
        return self + other

    def __rsub__(self, other):
        return other + (-self)

    def __rmul__(self, other):
        return self * other

    def __rtruediv__(self, other):
        return other * self**-1

    def __repr__(self):
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g})"
# --8<-- [end:value]


# --8<-- [start:exercise-1]
# Exercise 1: tanh for Value
def tanh(self):
    """Return tanh(self) as a new Value whose _backward adds d tanh(x)/dx * out.grad
    to self.grad. Hint: d tanh(x)/dx = 1 - tanh(x)**2, and tanh(x) is out.data."""
    t = math.tanh(self.data)
    out = Value(t, (self,), "tanh")

    def _backward():
        self.grad += (1 - t**2) * out.grad

    out._backward = _backward
    return out


Value.tanh = tanh
# --8<-- [end:exercise-1]


# ---------------------------------------------------------------------------
# A neural network of Values
# ---------------------------------------------------------------------------

# --8<-- [start:mlp]
class Neuron:
    """tanh(w . x + b), or the bare weighted sum for an output neuron."""

    def __init__(self, n_inputs, nonlinear=True, rng=random):
        scale = 1 / math.sqrt(n_inputs)  # keeps w . x of order 1 at the start
        self.w = [Value(rng.uniform(-scale, scale)) for _ in range(n_inputs)]
        self.b = Value(0.0)
        self.nonlinear = nonlinear

    def __call__(self, x):
        act = sum((wi * xi for wi, xi in zip(self.w, x)), self.b)
        return act.tanh() if self.nonlinear else act

    def parameters(self):
        return self.w + [self.b]


class Layer:
    def __init__(self, n_inputs, n_outputs, **kwargs):
        self.neurons = [Neuron(n_inputs, **kwargs) for _ in range(n_outputs)]

    def __call__(self, x):
        out = [n(x) for n in self.neurons]
        return out[0] if len(out) == 1 else out

    def parameters(self):
        return [p for n in self.neurons for p in n.parameters()]


class MLP:
    """A multi-layer perceptron: tanh hidden layers and a linear output layer."""

    def __init__(self, n_inputs, layer_sizes, rng=random):
        sizes = [n_inputs] + layer_sizes
        self.layers = [
            Layer(sizes[i], sizes[i + 1], nonlinear=i < len(layer_sizes) - 1, rng=rng)
            for i in range(len(layer_sizes))
        ]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]
# --8<-- [end:mlp]


# --8<-- [start:dataset]
def make_moons(n, noise=0.1, seed=0):
    """Two interleaving half circles, labels 0 and 1: a toy set no line can separate."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * math.pi
    label = torch.arange(n) % 2
    x = torch.where(label == 0, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(label == 0, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], dim=1) + noise * torch.randn(n, 2, generator=g)
    return points, label
# --8<-- [end:dataset]


# --8<-- [start:train-value-mlp]
def logistic_loss(score, label):
    """-log p(label) for p(1) = sigmoid(score): log(1 + exp(-s * score)), s = +-1."""
    sign = 1.0 if label == 1 else -1.0
    return (1 + (-sign * score).exp()).log()


def train_value_mlp(points, labels, hidden=(16,), steps=60, lr=2.0, seed=0):
    """Full-batch gradient descent on the mean logistic loss. Returns (model, losses)."""
    model = MLP(2, list(hidden) + [1], rng=random.Random(seed))
    data = [([float(a), float(b)], int(c)) for (a, b), c in zip(points.tolist(), labels.tolist())]
    losses = []
    for _ in range(steps):
        loss = sum(logistic_loss(model(x), y) for x, y in data) / len(data)
        for p in model.parameters():
            p.grad = 0.0  # gradients accumulate (+=), so reset them every step
        loss.backward()
        for p in model.parameters():
            p.data -= lr * p.grad  # a step downhill
        losses.append(loss.data)
    return model, losses
# --8<-- [end:train-value-mlp]


# ---------------------------------------------------------------------------
# The same network with tensors and hand-derived gradients
# ---------------------------------------------------------------------------

# --8<-- [start:linear]
def linear_forward(x, weight, bias):
    """y = x W^T + b, as torch.nn.Linear: x (N, in), weight (out, in), bias (out,)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    return x @ weight.T + bias  # (N, out)
# --8<-- [end:linear]


# --8<-- [start:exercise-2]
# Exercise 2: the backward pass of a linear layer
def linear_backward(grad_out, x, weight):
    """Given G = dL/dy for y = x W^T + b, return (dL/dx, dL/dW, dL/db).

    Shapes: grad_out (N, out), x (N, in), weight (out, in). The results have the shapes
    of x, weight and the bias (out,). Derive each from y_nj = sum_i x_ni W_ji + b_j.
    """
    grad_x = grad_out @ weight  # (N, in):   dL/dx_ni = sum_j G_nj W_ji
    grad_weight = grad_out.T @ x  # (out, in): dL/dW_ji = sum_n G_nj x_ni
    grad_bias = grad_out.sum(dim=0)  # (out,):  dL/db_j  = sum_n G_nj
    return grad_x, grad_weight, grad_bias
# --8<-- [end:exercise-2]


# --8<-- [start:softmax-ce]
def softmax(logits):
    """Row-wise softmax; subtracting the row max changes nothing but prevents overflow."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    exp = shifted.exp()
    return exp / exp.sum(dim=-1, keepdim=True)


def cross_entropy(logits, targets):
    """Mean over rows of -log softmax(logits)[target], via log-sum-exp."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    log_probs = shifted - shifted.exp().sum(dim=-1, keepdim=True).log()  # (N, C)
    return -log_probs[torch.arange(len(targets)), targets].mean()
# --8<-- [end:softmax-ce]


# --8<-- [start:exercise-3]
# Exercise 3: the gradient of softmax with cross-entropy
def cross_entropy_backward(logits, targets):
    """dL/dlogits for L = cross_entropy(logits, targets) (mean over the N rows).

    The chapter derives (p - y) / N, where p = softmax(logits) and y is one-hot(targets).
    logits (N, C), targets (N,) of class indices; returns (N, C).
    """
    p = softmax(logits)
    y = torch.nn.functional.one_hot(targets, logits.shape[-1]).to(p.dtype)
    return (p - y) / len(targets)
# --8<-- [end:exercise-3]


# --8<-- [start:relu-backward]
def relu_backward(grad_out, x):
    """ReLU passes the gradient where its input was positive and blocks it elsewhere."""
    return grad_out * (x > 0).to(grad_out.dtype)
# --8<-- [end:relu-backward]


# --8<-- [start:tensor-mlp]
class TensorMLP:
    """Two linear layers with a ReLU between them, backpropagated by hand."""

    def __init__(self, n_inputs, n_hidden, n_classes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(n_hidden, n_inputs, generator=g) * math.sqrt(2 / n_inputs)
        self.b1 = torch.zeros(n_hidden)
        self.w2 = torch.randn(n_classes, n_hidden, generator=g) * math.sqrt(1 / n_hidden)
        self.b2 = torch.zeros(n_classes)

    def parameters(self):
        return [self.w1, self.b1, self.w2, self.b2]

    def forward(self, x):
        self.x = x  # keep what backward needs
        self.h_pre = linear_forward(x, self.w1, self.b1)  # (N, hidden)
        self.h = self.h_pre.clamp(min=0)  # ReLU
        return linear_forward(self.h, self.w2, self.b2)  # (N, classes): the logits

    def backward(self, grad_logits):
        """Gradients of the loss w.r.t. the parameters, in parameters() order."""
        grad_h, grad_w2, grad_b2 = linear_backward(grad_logits, self.h, self.w2)
        grad_h_pre = relu_backward(grad_h, self.h_pre)
        _, grad_w1, grad_b1 = linear_backward(grad_h_pre, self.x, self.w1)
        return [grad_w1, grad_b1, grad_w2, grad_b2]

    def predict(self, x):
        return self.forward(x).argmax(dim=-1)
# --8<-- [end:tensor-mlp]


# --8<-- [start:spiral]
def make_spiral(n_per_class, n_classes=3, noise=0.2, seed=0):
    """Interleaved spiral arms, one per class: a classic test of a non-linear classifier."""
    g = torch.Generator().manual_seed(seed)
    radius = torch.linspace(0.05, 1, n_per_class).repeat(n_classes)
    label = torch.arange(n_classes).repeat_interleave(n_per_class)
    angle = (
        label * (2 * math.pi / n_classes)
        + radius * 4
        + noise * torch.randn(len(label), generator=g)
    )
    points = torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1)
    return points, label
# --8<-- [end:spiral]


# --8<-- [start:train-tensor-mlp]
def train_tensor_mlp(points, labels, n_hidden=64, steps=500, lr=1.0, seed=0):
    """Full-batch gradient descent with the hand-written backward. Returns (model, losses)."""
    model = TensorMLP(points.shape[1], n_hidden, int(labels.max()) + 1, seed=seed)
    losses = []
    for _ in range(steps):
        logits = model.forward(points)
        losses.append(cross_entropy(logits, labels).item())
        grads = model.backward(cross_entropy_backward(logits, labels))
        for param, grad in zip(model.parameters(), grads):
            param -= lr * grad  # in place: the model holds these tensors
    return model, losses
# --8<-- [end:train-tensor-mlp]


# --8<-- [start:linear-function]
class LinearFunction(torch.autograd.Function):
    """Our linear layer as an autograd Function, so torch.autograd.gradcheck can test
    the hand-derived backward against finite differences."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return linear_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        return linear_backward(grad_out, x, weight)


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy with the hand-derived gradient (p - y) / N."""

    @staticmethod
    def forward(ctx, logits, targets):
        ctx.save_for_backward(logits, targets)
        return cross_entropy(logits, targets)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets = ctx.saved_tensors
        return grad_loss * cross_entropy_backward(logits, targets), None
# --8<-- [end:linear-function]


# --8<-- [start:exercise-4]
# Exercise 4: a gradient checker that finds backward bugs
def max_gradient_error(f, inputs, h=1e-6):
    """Check a Value function's backward against central differences.

    f takes a list of floats, builds Values from them, and returns a Value. Return the
    largest |autodiff gradient - numerical gradient| over the inputs. A correct
    backward gives a tiny error (about 1e-8); a wrong one, an error of order 1.
    """
    xs = [Value(v) for v in inputs]
    f_values = lambda vs: f([Value(v) for v in vs]).data  # noqa: E731 (a plain function of floats)
    out = f(xs)
    out.backward()
    worst = 0.0
    for i, x in enumerate(xs):
        def along_i(t, i=i):
            shifted = list(inputs)
            shifted[i] = t
            return f_values(shifted)

        worst = max(worst, abs(x.grad - numerical_derivative(along_i, inputs[i], h)))
    return worst
# --8<-- [end:exercise-4]


# --8<-- [start:buggy-square]
def buggy_square(v):
    """x**2 with a planted bug in its backward pass, for Exercise 4 to catch."""
    out = Value(v.data**2, (v,), "sq")

    def _backward():
        v.grad += v.data * out.grad  # wrong: d(x^2)/dx is 2x

    out._backward = _backward
    return out
# --8<-- [end:buggy-square]


# ---------------------------------------------------------------------------
# Figures (drawn at build time)
# ---------------------------------------------------------------------------

def _decision_grid(predict, points, steps=150):
    lo, hi = points.min(dim=0).values - 0.3, points.max(dim=0).values + 0.3
    xs, ys = torch.linspace(lo[0], hi[0], steps), torch.linspace(lo[1], hi[1], steps)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    return gx, gy, predict(grid).reshape(gx.shape)


def plot_value_mlp():
    """Loss curve and decision boundary of the Value network trained on the moons."""
    import matplotlib.pyplot as plt

    points, labels = make_moons(40, seed=0)
    model, losses = train_value_mlp(points, labels)
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_loss.plot(losses)
    ax_loss.set(xlabel="gradient-descent step", ylabel="mean logistic loss", title="Training loss")

    def predict(grid):
        return torch.tensor([model([float(a), float(b)]).data > 0 for a, b in grid.tolist()])

    gx, gy, region = _decision_grid(predict, points, steps=40)
    ax_map.contourf(gx, gy, region.float(), levels=[-0.5, 0.5, 1.5], alpha=0.25, cmap="coolwarm")
    ax_map.scatter(
        points[:, 0], points[:, 1], c=labels, cmap="coolwarm", s=12, edgecolors="k", linewidths=0.3
    )
    ax_map.set(title="Decision boundary", xticks=[], yticks=[])
    fig.tight_layout()
    return fig


def plot_tensor_mlp():
    """Loss curve and decision regions of the hand-backpropagated tensor network."""
    import matplotlib.pyplot as plt

    points, labels = make_spiral(100)
    model, losses = train_tensor_mlp(points, labels)
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_loss.semilogy(losses)
    ax_loss.set(xlabel="gradient-descent step", ylabel="cross-entropy", title="Training loss")
    gx, gy, region = _decision_grid(model.predict, points)
    ax_map.contourf(gx, gy, region, levels=[-0.5, 0.5, 1.5, 2.5], alpha=0.25, cmap="viridis")
    ax_map.scatter(
        points[:, 0], points[:, 1], c=labels, cmap="viridis", s=10, edgecolors="k", linewidths=0.3
    )
    ax_map.set(title="Decision regions", xticks=[], yticks=[])
    fig.tight_layout()
    return fig
