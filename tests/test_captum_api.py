"""``dynamiclrp.captum``: Captum's attribution interface (``DynamicLRP(model).attribute``).

Oracles:

- Captum's ``InputXGradient``: on a bias-free ReLU network (linear layers, convolutions, max and
  average pooling) in float64, LRP with the epsilon rule and ``eps -> 0`` is exactly gradient x
  input.  With the same ``target`` argument, Captum's own target selection (``_select_targets``)
  then checks ours for every form of the grammar, and tuple inputs with
  ``additional_forward_args``.
- Seeds built by hand in the tests (loops over the batch, no library code) passed to
  ``dynamiclrp.explain(relevance=...)``.
- Convergence delta of ``Linear -> ReLU -> Linear`` with biases under the epsilon rule, from its
  closed form (weights only): the second layer's bias absorbs ``b2_k``; the first passes on the
  fraction ``(W1 x)_j / stab(z1_j)`` of each hidden unit's relevance ``h_j W2_kj``.
- Quantus (if installed): a metric run with ``explain_func=quantus_explain_func`` gives the same
  score as the same metric on attributions precomputed with ``attribute``.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp.captum import DynamicLRP, quantus_explain_func
from dynamiclrp.errors import GraphError, InputError, TargetError, ValueRecoveryError

D = torch.float64
TINY = replace(dynamiclrp.preset("epsilon"), eps=1e-13)  # LRP-0 up to 1e-13


def _close(a, b, tol=1e-9):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item() / scale
    assert err <= tol, f"relative error {err:.3g} > {tol}"


# -- models -----------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, bias=True, n_in=6, n_out=4):
        super().__init__()
        self.l1, self.act, self.l2 = (
            nn.Linear(n_in, 8, bias=bias),
            nn.ReLU(),
            nn.Linear(8, n_out, bias=bias),
        )

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


class CNN(nn.Module):
    """Conv, ReLU, max pool, conv, ReLU, average pool, flatten, linear."""

    def __init__(self, bias=True):
        super().__init__()
        self.c1, self.r1, self.p1 = (
            nn.Conv2d(2, 4, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.c2, self.r2, self.p2 = (
            nn.Conv2d(4, 4, 3, padding=1, bias=bias),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.fc = nn.Linear(16, 5, bias=bias)

    def forward(self, x):
        h = self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))
        return self.fc(h.flatten(1))


class Grid(nn.Module):
    """A (N, 3, 4) output (a map of scores per example), bias-free."""

    def __init__(self, last=4):
        super().__init__()
        self.last = last
        self.l1, self.act, self.l2 = (
            nn.Linear(6, 8, bias=False),
            nn.ReLU(),
            nn.Linear(8, 3 * last, bias=False),
        )

    def forward(self, x):
        return self.l2(self.act(self.l1(x))).reshape(x.shape[0], 3, self.last)


class Scalar(nn.Module):
    """One value per example: shape (N,) (``keep=False``) or (N, 1)."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep
        self.l1, self.act, self.l2 = (
            nn.Linear(6, 8, bias=False),
            nn.ReLU(),
            nn.Linear(8, 1, bias=False),
        )

    def forward(self, x):
        y = self.l2(self.act(self.l1(x)))
        return y if self.keep else y[:, 0]


class TwoInputs(nn.Module):
    """``forward(a, b, scale, mode)``: two data inputs and two additional arguments."""

    def __init__(self):
        super().__init__()
        self.la, self.lb = nn.Linear(6, 8, bias=False), nn.Linear(5, 8, bias=False)
        self.act, self.out = nn.ReLU(), nn.Linear(8, 4, bias=False)

    def forward(self, a, b, scale, mode="sum"):
        h = self.la(a) * scale + self.lb(b) if mode == "sum" else self.la(a) * scale
        return self.out(self.act(h))


def _make(cls, *args, dtype=D, seed=0):
    torch.manual_seed(seed)
    return cls(*args).to(dtype).eval()


def _data(*shape, dtype=D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _ixg(model, inputs, target=None, additional_forward_args=None):
    captum_attr = pytest.importorskip("captum.attr")
    if isinstance(inputs, tuple):
        inputs = tuple(t.clone().requires_grad_(True) for t in inputs)
    else:
        inputs = inputs.clone().requires_grad_(True)
    return captum_attr.InputXGradient(model).attribute(
        inputs, target=target, additional_forward_args=additional_forward_args
    )


def _explain_with_seed(model, x, seed_fn):
    """dynamiclrp.explain with a seed that ``seed_fn(output)`` builds by hand."""
    xr = x.detach().clone().requires_grad_(True)
    out = model(xr)
    return dynamiclrp.explain(out, xr, relevance=seed_fn(out.detach()), rules=TINY)


# -- the same numbers as dynamiclrp.explain ------------------------------------------------


@pytest.mark.parametrize("rules", ["dynamiclrp", "epsilon", "zplus"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_explain(kind, rules):
    model = _make(MLP) if kind == "mlp" else _make(CNN)
    x = _data(3, 6) if kind == "mlp" else _data(3, 2, 8, 8)
    target = [1, 0, 3]
    got = DynamicLRP(model, rules).attribute(x, target=target)
    xr = x.clone().requires_grad_(True)
    want = dynamiclrp.explain(model(xr), xr, target=target, rules=rules)
    assert got.shape == x.shape and got.dtype == x.dtype and got.device == x.device
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_plain_callable_and_float32():
    model = _make(MLP, dtype=torch.float32)
    x = _data(2, 6, dtype=torch.float32)
    got = DynamicLRP(lambda t: model(t)).attribute(x, target=2)
    want = DynamicLRP(model).attribute(x, target=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- independent oracle: Captum's InputXGradient ---------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_epsilon_tiny_eps_equals_input_x_gradient(kind):
    model = _make(MLP, False) if kind == "mlp" else _make(CNN, False)
    x = _data(3, 6) if kind == "mlp" else _data(3, 2, 8, 8)
    target = [1, 0, 3]
    got = DynamicLRP(model, TINY).attribute(x, target=target)
    _close(got, _ixg(model, x, target))
    assert got.abs().sum() > 0


TARGETS_2D = [
    2,
    -1,
    torch.tensor(3),
    torch.tensor([1]),
    [0, 3, 1],
    torch.tensor([2, 2, 0]),
    [-1, 2, 0],  # Captum's gather rejects negative classes; checked against the seed only
]


@pytest.mark.parametrize("target", TARGETS_2D, ids=repr)
def test_targets_on_2d_output(target):
    model, x = _make(MLP, False), _data(3, 6)
    got = DynamicLRP(model, TINY).attribute(x, target=target)
    if not (isinstance(target, list) and min(target) < 0):
        _close(got, _ixg(model, x, target))
    if isinstance(target, torch.Tensor) and target.numel() > 1:
        classes = target.tolist()
    elif isinstance(target, list):
        classes = target
    else:
        classes = [int(target)] * 3

    def seed(out):
        s = torch.zeros_like(out)
        for i, k in enumerate(classes):
            s[i, k] = out[i, k]
        return s

    _close(got, _explain_with_seed(model, x, seed))


TARGETS_3D = [(1, 2), (-1, 0), [(0, 1), (2, 3), (1, -1)], (slice(1, 2), 3)]


@pytest.mark.parametrize("target", TARGETS_3D, ids=repr)
def test_targets_on_3d_output(target):
    model, x = _make(Grid), _data(3, 6)
    got = DynamicLRP(model, TINY).attribute(x, target=target)
    _close(got, _ixg(model, x, target))
    per_row = target if isinstance(target, list) else [target] * 3

    def seed(out):
        s = torch.zeros_like(out)
        for i, t in enumerate(per_row):
            a, b = (1 if isinstance(t[0], slice) else t[0]), t[1]
            s[i, a, b] = out[i, a, b]
        return s

    _close(got, _explain_with_seed(model, x, seed))


def test_int_target_on_n_a_1_output_and_none_on_scalar_outputs():
    x = _data(3, 6)
    model = _make(Grid, 1)  # (N, 3, 1): an int picks the row, one value remains
    got = DynamicLRP(model, TINY).attribute(x, target=2)
    _close(got, _ixg(model, x, 2))
    for keep in (False, True):
        model = _make(Scalar, keep)
        got = DynamicLRP(model, TINY).attribute(x)
        _close(got, _ixg(model, x))
        _close(got, _explain_with_seed(model, x, lambda out: out.clone()))


@pytest.mark.parametrize(
    ("model_kind", "target", "match"),
    [
        ("mlp", None, "one scalar per example"),
        ("grid", 1, "one scalar per example"),
        ("grid", (1,), "one scalar per example"),
        ("grid", [1, 2, 0], "2-D"),
        ("grid", (1, 2, 0), "dimension"),
        ("grid", (3, 0), "out of range"),
        ("mlp", 4, "out of range"),
        ("mlp", [0, 1], "3 examples"),
        ("mlp", [0, 4, 1], "out of range"),
        ("mlp", [0, (1,), 1], "either ints"),
        ("mlp", torch.tensor([0.0, 1.0, 2.0]), "integer"),
        ("mlp", torch.tensor([[0, 1, 2]]), "1-D"),
        ("mlp", torch.tensor([0, 1]), "1-D"),
        ("mlp", True, "bool"),
        ("mlp", 1.0, "float"),
        ("mlp", np.array([0, 1, 2]), "torch.as_tensor"),
    ],
    ids=repr,
)
def test_target_errors(model_kind, target, match):
    model = _make(MLP) if model_kind == "mlp" else _make(Grid)
    with pytest.raises(TargetError, match=match):
        DynamicLRP(model).attribute(_data(3, 6), target=target)


# -- tuple inputs, additional_forward_args ------------------------------------------------------


def test_tuple_inputs_and_additional_forward_args():
    model = _make(TwoInputs)
    a, b, scale = _data(3, 6, seed=1), _data(3, 5, seed=2), _data(3, 1, seed=3).abs() + 0.5
    target = [0, 3, 2]
    got = DynamicLRP(model, TINY).attribute(
        (a, b), target=target, additional_forward_args=(scale, "sum")
    )
    assert isinstance(got, tuple) and len(got) == 2
    assert got[0].shape == a.shape and got[1].shape == b.shape
    want = _ixg(model, (a, b), target, (scale, "sum"))
    _close(got[0], want[0])
    _close(got[1], want[1])
    # a single non-tuple additional argument is wrapped, as in Captum
    got1 = DynamicLRP(model, TINY).attribute((a, b), target=target, additional_forward_args=scale)
    for g, w in zip(got1, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # a one-tuple of inputs gives a one-tuple back
    single = DynamicLRP(model, TINY).attribute(
        (a,), target=1, additional_forward_args=(b, scale, "a only")
    )
    assert isinstance(single, tuple) and len(single) == 1
    _close(single[0], _ixg(model, (a,), 1, (b, scale, "a only"))[0])


# -- convergence delta --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_delta_is_zero_for_a_conserving_net(kind):
    model = _make(MLP, False) if kind == "mlp" else _make(CNN, False)
    x = _data(3, 6) if kind == "mlp" else _data(3, 2, 8, 8)
    lrp = DynamicLRP(model, replace(dynamiclrp.preset("epsilon"), eps=1e-10))
    assert lrp.has_convergence_delta()
    attr, delta = lrp.attribute(x, target=[1, 0, 3], return_convergence_delta=True)
    out = model(x)[torch.arange(3), torch.tensor([1, 0, 3])]
    assert delta.shape == (3,) and delta.dtype == D
    assert delta.abs().max() <= 1e-7 * out.abs().max()
    torch.testing.assert_close(attr.flatten(1).sum(1) + delta, out.detach(), rtol=1e-12, atol=1e-12)


def test_delta_with_bias_equals_closed_form():
    model, x, eps = _make(MLP, True), _data(3, 6), 1e-6
    target = [1, 0, 3]
    lrp = DynamicLRP(model, replace(dynamiclrp.preset("epsilon"), eps=eps))
    attr, delta = lrp.attribute(x, target=target, return_convergence_delta=True)
    w1, b1 = model.l1.weight.detach(), model.l1.bias.detach()
    w2, b2 = model.l2.weight.detach(), model.l2.bias.detach()
    want = []
    for i, k in enumerate(target):
        z1 = w1 @ x[i] + b1
        h = z1.clamp(min=0)
        z2 = w2[k] @ h + b2[k]
        stab2 = z2 + eps * (1.0 if z2 >= 0 else -1.0)
        r_h = h * w2[k] / stab2 * z2  # relevance of each hidden unit
        stab1 = z1 + eps * torch.where(z1 >= 0, 1.0, -1.0)
        r_x = ((w1 @ x[i]) / stab1 * r_h).sum()  # what the first layer passes to x
        want.append(z2 - r_x)
    want = torch.stack(want)
    assert want.abs().min() > 1e-3  # the biases make it nonzero
    _close(delta, want, tol=1e-8)
    out = model(x)[torch.arange(3), torch.tensor(target)]
    torch.testing.assert_close(
        lrp.compute_convergence_delta(attr, out), delta, rtol=1e-12, atol=1e-12
    )


def test_delta_dtype_follows_output_and_tuple_inputs_are_summed():
    model = _make(TwoInputs, dtype=torch.float32)
    a, b, scale = _data(2, 6, dtype=torch.float32), _data(2, 5, dtype=torch.float32), 1.5
    attr, delta = DynamicLRP(model, "epsilon").attribute(
        (a, b), target=1, additional_forward_args=scale, return_convergence_delta=True
    )
    assert delta.shape == (2,) and delta.dtype == torch.float32
    out = model(a, b, scale)[:, 1].detach().double()
    want = out - attr[0].double().sum(1) - attr[1].double().sum(1)
    torch.testing.assert_close(delta.double(), want, rtol=0, atol=1e-6)


# -- no side effects --------------------------------------------------------------------------


def _hooks(model):
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, n)) for m in model.modules() for n in names)


@pytest.mark.parametrize("training", [False, True])
def test_model_and_inputs_untouched(training):
    model = _make(CNN).train(training)
    model.c2.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    x = _data(2, 2, 8, 8)
    y = _data(2, 2, 8, 8).requires_grad_(True)
    keep_x, keep_y, version = x.clone(), y.detach().clone(), x._version
    lrp = DynamicLRP(model, record=True)  # frozen parameters need the recording
    for inp in (x, y, y * 2):
        attr = lrp.attribute(inp, target=1)
        assert attr.requires_grad is False and attr.grad_fn is None
    assert torch.equal(x, keep_x) and torch.equal(y.detach(), keep_y) and x._version == version
    assert not x.requires_grad and y.requires_grad and y.grad is None and x.grad is None
    assert all(m.training is training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert _hooks(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_frozen_parameters_without_record_say_what_to_do():
    model = _make(MLP)
    model.requires_grad_(False)
    with pytest.raises(ValueRecoveryError, match="record=True"):
        DynamicLRP(model, record=False).attribute(_data(2, 6), target=0)
    assert not any(p.requires_grad for p in model.parameters())
    got = DynamicLRP(model).attribute(_data(2, 6), target=0)  # records by default
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(got, DynamicLRP(model, record=True).attribute(_data(2, 6), target=0))
    model.requires_grad_(True)
    want = DynamicLRP(model).attribute(_data(2, 6), target=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_input_errors():
    model = _make(MLP)
    x = _data(2, 6)
    with pytest.raises(InputError, match="tuple of tensors"):
        DynamicLRP(model).attribute([x], target=0)
    with pytest.raises(InputError, match="tuple of tensors"):
        DynamicLRP(model).attribute((), target=0)
    with pytest.raises(InputError, match="floating-point"):
        DynamicLRP(lambda t: model(t.double())).attribute(torch.ones(2, 6, dtype=torch.long), 0)
    with pytest.raises(InputError, match="not a tensor"):
        DynamicLRP(lambda t: (model(t),)).attribute(x, target=0)
    with pytest.raises(InputError, match="batch"):
        DynamicLRP(lambda t: model(t).sum()).attribute(x)
    with pytest.raises(InputError, match="callable"):
        DynamicLRP("model")
    with torch.inference_mode(), pytest.raises(GraphError, match="inference_mode"):
        DynamicLRP(model).attribute(x, target=0)
    with torch.no_grad():  # like Captum, no_grad around the call is fine
        torch.testing.assert_close(
            DynamicLRP(model).attribute(x, target=0), DynamicLRP(model).attribute(x, target=0)
        )


# -- Quantus ------------------------------------------------------------------------------------


def test_quantus_explain_func_signature():
    model, x = _make(CNN, dtype=torch.float32), _data(3, 2, 8, 8, dtype=torch.float32)
    y = np.array([4, 0, 2])
    got = quantus_explain_func(
        model=model, inputs=x.numpy(), targets=y, rules="epsilon", device="cpu"
    )
    want = DynamicLRP(model, "epsilon").attribute(x, target=torch.tensor([4, 0, 2]))
    assert isinstance(got, np.ndarray) and got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want.numpy())
    # float32 data for a float64 model is cast to the model's dtype, returned in the data's dtype
    model64 = _make(CNN)
    got64 = quantus_explain_func(model64, x.numpy(), y)
    want64 = DynamicLRP(model64).attribute(x.double(), target=[4, 0, 2])
    assert got64.dtype == np.float32
    np.testing.assert_allclose(got64, want64.numpy().astype(np.float32), rtol=0, atol=0)
    with pytest.raises(TargetError, match="integer"):
        quantus_explain_func(model, x.numpy(), np.array([0.5, 1.0, 2.0]))


def test_quantus_metric_uses_explain_func():
    quantus = pytest.importorskip("quantus")
    model, x = _make(CNN, dtype=torch.float32), _data(4, 2, 8, 8, dtype=torch.float32)
    y = model(x).argmax(1).numpy()
    calls = []

    def explain_func(model, inputs, targets, **kwargs):
        calls.append(kwargs)
        return quantus_explain_func(model, inputs, targets, **kwargs)

    kwargs = {"rules": "epsilon"}
    metric = quantus.Sparseness(disable_warnings=True, display_progressbar=False)
    via_func = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=y,
        explain_func=explain_func,
        explain_func_kwargs=kwargs,
        device="cpu",
    )
    assert calls == [{"rules": "epsilon", "device": "cpu"}]
    a = DynamicLRP(model, "epsilon").attribute(x, target=torch.as_tensor(y)).numpy()
    metric = quantus.Sparseness(disable_warnings=True, display_progressbar=False)
    precomputed = metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=a, device="cpu")
    assert len(via_func) == 4
    np.testing.assert_allclose(via_func, precomputed, rtol=1e-6)
    # a metric that perturbs the input and queries the model again
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=5,
        subset_size=8,
        return_aggregate=False,
        perturb_baseline="black",
        disable_warnings=True,
        display_progressbar=False,
    )
    scores = metric(
        model=model, x_batch=x.numpy(), y_batch=y, explain_func=quantus_explain_func, device="cpu"
    )
    assert len(scores) == 4 and np.all(np.isfinite(scores))
