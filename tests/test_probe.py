"""Unknown custom ``torch.autograd.Function`` nodes probed for being element-wise
(``dynamiclrp.rules.probe``, called from ``engine.make_plan``).

A node with one tensor input and one output of the same shape whose backward is a diagonal scaling
(``J^T v = (J^T 1) * v``) gets the identity rule and is listed in the report; anything else keeps
the ``UncoveredOpError``, now saying why the probe declined.  The oracles: the same model written
with the built-in op the Function re-implements (an op-table node with the identity rule) gives the
same map under every preset, and LRP-0 through a linear Function equals gradient x input.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from oracle import close, gen

import dynamiclrp
from dynamiclrp.errors import UncoveredOpError
from dynamiclrp.presets import PRESETS

DT = torch.float64
LRP0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)


class GeLUFunction(torch.autograd.Function):
    """BLOOM's tanh-approximated GeLU as a custom Function (``bloom_gelu_forward/back``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))


class Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class Scale(torch.autograd.Function):
    """One tensor input and a Python number: still element-wise, but no replay (the number is
    recorded nowhere)."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x * k

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


class CumSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.cumsum(-1)

    @staticmethod
    def backward(ctx, g):
        return g.flip(-1).cumsum(-1).flip(-1)


class AddTwo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return x + y

    @staticmethod
    def backward(ctx, g):
        return g, g


class RowSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum(-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., None].expand(-1, 4)


class Broken(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("backward not implemented here")


def mlp(act, seed=0):
    torch.manual_seed(seed)
    l1, l2 = torch.nn.Linear(4, 5).double(), torch.nn.Linear(5, 3).double()
    return lambda x: l2(act(l1(x)))


def test_custom_gelu_equals_builtin_gelu_under_every_preset():
    g = gen(1)
    x = torch.randn(2, 4, generator=g, dtype=DT).requires_grad_()
    custom = mlp(GeLUFunction.apply)
    builtin = mlp(lambda t: F.gelu(t, approximate="tanh"))
    for name in PRESETS:
        a, rep = dynamiclrp.explain(custom(x), x, target=1, rules=name, return_report=True)
        b = dynamiclrp.explain(builtin(x), x, target=1, rules=name)
        close(a, b, rtol=1e-9, atol=1e-12)
        assert rep.probed == ["GeLUFunctionBackward"]
    assert "probed element-wise (identity rule): GeLUFunctionBackward" in str(rep)


def test_lrp0_through_a_linear_custom_function_is_gradient_x_input():
    g = gen(2)
    x = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()
    w = torch.randn(4, 4, generator=g, dtype=DT)
    out = Double.apply(x @ w) @ w
    rel = dynamiclrp.explain(out, x, relevance=out.detach().clone(), rules=LRP0)
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    close(rel, x.detach() * gx, rtol=1e-9, atol=1e-9)


def test_a_python_number_argument_is_fine_but_not_replayed():
    g = gen(3)
    x = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(3, 4, generator=g, dtype=DT)
    rel, rep = dynamiclrp.explain(Scale.apply(x, 3.0), x, relevance=r, return_report=True)
    close(rel, r)
    assert rep.probed == ["ScaleBackward"]
    # its value is needed below the add (the sum is not known): no replay, a loud error
    b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=DT))
    with pytest.raises(dynamiclrp.errors.ValueRecoveryError, match="ScaleBackward"):
        dynamiclrp.explain(torch.tanh(Scale.apply(x, 3.0) * 2.0 + b), x, relevance=r)


def test_probed_function_is_replayed_when_its_value_is_needed():
    """``tanh(gelu(x) * 2 + b)``: the add needs ``gelu(x) * 2``, replayed from the Function's
    forward (``GeLUFunction.apply``); the map equals the built-in gelu's (whose node replays)."""
    g = gen(4)
    x = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()
    b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=DT))
    r = torch.randn(3, 4, generator=g, dtype=DT)
    a = dynamiclrp.explain(torch.tanh(GeLUFunction.apply(x) * 2.0 + b), x, relevance=r)
    e = dynamiclrp.explain(torch.tanh(F.gelu(x, approximate="tanh") * 2.0 + b), x, relevance=r)
    close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda x: CumSum.apply(x), "mixes elements"),
        (lambda x: AddTwo.apply(x, x * 2), "2 tensor inputs"),
        (lambda x: RowSum.apply(x)[:, None] * x, "shape"),
        (lambda x: Broken.apply(x), "raised RuntimeError: backward not implemented"),
    ],
)
def test_functions_that_are_not_elementwise_stay_refused(make, why):
    x = torch.randn(3, 4, dtype=DT).requires_grad_()
    out = make(x)
    with pytest.raises(UncoveredOpError, match="probed for being element-wise") as err:
        dynamiclrp.explain(out, x, relevance=torch.ones(out.shape, dtype=DT))
    assert why in str(err.value)
    assert "Nothing was propagated" in str(err.value)


def test_probe_result_is_part_of_the_cached_plan():
    g = gen(5)
    x = torch.randn(2, 4, generator=g, dtype=DT).requires_grad_()
    f = mlp(GeLUFunction.apply)
    lrp = dynamiclrp.LRP("epsilon")
    a = lrp.explain(f(x), x, target=0)
    b = lrp.explain(f(x), x, target=0)
    assert lrp.last_plan_cached and lrp.report.probed == ["GeLUFunctionBackward"]
    close(a, b)


def test_bloom_gelu_function_is_probed_and_matches_nn_gelu():
    """BLOOM's MLP runs ``GeLUFunction.apply`` (node ``GeLUFunctionBackward``): a tiny random BLOOM
    is explained, and the map equals that of the same model with ``nn.GELU("tanh")`` swapped in
    (the identity rule either way; the constants of BLOOM's tanh formula differ in the 9th
    digit)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BloomConfig(vocab_size=50, hidden_size=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(cfg).double().eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    maps = []
    for swap in (False, True):
        if swap:
            for block in model.transformer.h:
                block.mlp.gelu_impl = torch.nn.GELU(approximate="tanh")
        with dynamiclrp.record(model) as rec:  # ALiBi's mask add needs the recording
            out = model(inputs_embeds=emb).logits[:, -1]
        rel, rep = dynamiclrp.explain(
            out, emb, target=3, rules="attnlrp", recording=rec, return_report=True
        )
        assert rep.probed == ([] if swap else ["GeLUFunctionBackward"])
        assert abs(rep.residual) < 1e-10
        maps.append(rel)
    close(maps[0], maps[1], rtol=1e-6, atol=1e-9)
