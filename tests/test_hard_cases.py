"""Hard cases: each one either works (checked against an oracle) or is refused with a specific error.

Oracles are independent of the library: LRP-0 on a bias-free (or biased) ReLU network equals
gradient x input (computed here with ``torch.autograd.grad``), and a model written in a plain form
(dropout as a fixed mask, one module per use instead of a shared one, no checkpointing, no
compilation) is explained by the same rules.  ``docs/hard-cases.md`` lists every case, its
behaviour and its test.  Cases that need a change in the engine are ``xfail(strict=True)`` with the
needed fix as the reason: when the fix lands the test passes, strict xfail fails the run, and the
mark is removed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import dynamiclrp
from dynamiclrp import GraphError, Rules, UncoveredOpError, ValueRecoveryError
from dynamiclrp.rules import OpEntry

D = torch.float64
LRP0 = Rules(eps=1e-12, add="signed", reduction="signed")


def leaf(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=D, generator=g).requires_grad_()


def mlp(seed: int = 0, bias: bool = True, dropout: float | None = None) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 10, bias=bias), nn.ReLU()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(10, 4, bias=bias))
    return nn.Sequential(*layers).double().eval()


def grad_x_input(f, x: torch.Tensor, target: int) -> torch.Tensor:
    """Gradient x input of ``f(x)[:, target]``: the LRP-0 oracle of a ReLU network."""
    xi = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(f(xi)[:, target].sum(), xi)
    return g * xi.detach()


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The same model written two ways, explained by the same rules: equal up to rounding."""
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)


def close_to_oracle(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """LRP-0 (``eps = 1e-12``) against gradient x input: the stabiliser moves small
    pre-activations by up to ~1e-10 (the tolerance of ``test_traversal.py``'s LRP-0 tests)."""
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9)


# --- training mode with dropout -----------------------------------------------------------------


def test_train_mode_dropout_explains_the_sampled_mask():
    """Works: a training-mode forward pass is explained with the mask it sampled, exactly as the
    same model in eval mode with that mask applied as a constant multiply."""
    model = mlp(1, dropout=0.5).train()
    x = leaf(3, 6, seed=1)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)  # the same draw: a dropout of the same shape consumes the same numbers
    mask = F.dropout(torch.ones(3, 10, dtype=D), 0.5, training=True)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    plain = model.eval()

    def fixed_mask(a):
        return plain[3](plain[1](plain[0](a)) * mask)

    assert torch.equal(out, fixed_mask(x))
    for rules in ("dynamiclrp", "epsilon", LRP0):
        close(
            dynamiclrp.explain(out, x, target=1, rules=rules),
            dynamiclrp.explain(fixed_mask(x), x, target=1, rules=rules),
        )
    close_to_oracle(
        dynamiclrp.explain(out, x, target=1, rules=LRP0), grad_x_input(fixed_mask, x, 1)
    )


# --- gradient checkpointing ---------------------------------------------------------------------


def test_non_reentrant_checkpoint_equals_the_plain_model():
    """Works: ``use_reentrant=False`` records the ordinary graph; saved tensors are recomputed on
    access.  A dropout inside the segment is recomputed with the same mask, the explanation does
    not move the global RNG, and the graph can still be backpropagated afterwards."""
    model = mlp(2, dropout=0.3).train()
    x = leaf(4, 6, seed=2)
    torch.manual_seed(3)
    out = checkpoint(model, x, use_reentrant=False)
    torch.manual_seed(3)
    plain = model(x)
    assert torch.equal(out, plain)
    rng = torch.get_rng_state()
    rel = dynamiclrp.explain(out, x, target=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(rel, dynamiclrp.explain(plain, x, target=2))
    close(
        dynamiclrp.explain(out, x, target=2, rules=LRP0),
        dynamiclrp.explain(plain, x, target=2, rules=LRP0),
    )
    (g_ckpt,) = torch.autograd.grad(out[:, 2].sum(), x)
    (g_plain,) = torch.autograd.grad(plain[:, 2].sum(), x)
    assert torch.equal(g_ckpt, g_plain)


def test_reentrant_checkpoint_is_refused_naming_the_node():
    """Refused: the reentrant checkpoint runs its segment without recording, so the graph holds one
    opaque ``CheckpointFunctionBackward`` node; nothing is propagated."""
    model = mlp(2)
    x = leaf(4, 6, seed=2)
    out = checkpoint(model, x, use_reentrant=True)
    with pytest.raises(UncoveredOpError, match="CheckpointFunctionBackward x1"):
        dynamiclrp.explain(out, x, target=0)


def test_reentrant_checkpoint_error_says_use_reentrant_false():
    model = mlp(2)
    x = leaf(4, 6, seed=2)
    out = checkpoint(model, x, use_reentrant=True)
    with pytest.raises(UncoveredOpError, match="use_reentrant=False"):
        dynamiclrp.explain(out, x, target=0)


# --- torch.compile ------------------------------------------------------------------------------


def test_compile_with_dynamo_only_backend_equals_the_plain_model():
    """Works: ``backend="eager"`` (TorchDynamo capture, ops run eagerly) records ordinary nodes."""
    torch._dynamo.reset()
    model = mlp(3)
    x = leaf(3, 6, seed=3)
    out = torch.compile(model, backend="eager")(x)
    assert torch.equal(
        dynamiclrp.explain(out, x, target=0), dynamiclrp.explain(model(x), x, target=0)
    )


def _compiled_refusal(backend: str) -> None:
    torch._dynamo.reset()
    model = mlp(3)
    x = leaf(3, 6, seed=3)
    out = torch.compile(model, backend=backend)(x)
    with pytest.raises(UncoveredOpError, match="CompiledFunctionBackward x1"):
        dynamiclrp.explain(out, x, target=0)


def test_compile_with_aot_autograd_is_refused_naming_compiled_function_backward():
    """Refused: AOTAutograd (``aot_eager``, ``inductor``) fuses the backward into one opaque
    ``CompiledFunctionBackward`` node."""
    _compiled_refusal("aot_eager")


@pytest.mark.slow
def test_compile_with_inductor_is_refused_naming_compiled_function_backward():
    """The default backend; its compile takes ~20 s on CPU (hence slow)."""
    _compiled_refusal("inductor")


def test_compiled_error_says_explain_the_uncompiled_model():
    torch._dynamo.reset()
    model = mlp(3)
    x = leaf(3, 6, seed=3)
    out = torch.compile(model, backend="aot_eager")(x)
    with pytest.raises(UncoveredOpError, match="_orig_mod"):
        dynamiclrp.explain(out, x, target=0)


# --- no_grad, inference_mode, freed graphs ------------------------------------------------------


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_output_without_graph_is_refused(mode):
    model = mlp(4)
    x = leaf(2, 6, seed=4)
    with mode():
        out = model(x)
    with pytest.raises(GraphError, match=r"no grad_fn[\s\S]*no_grad\(\) or inference_mode") as err:
        dynamiclrp.explain(out, x, target=0)
    assert ("inference tensor" in str(err.value)) == (mode is torch.inference_mode)


def test_input_behind_a_no_grad_block_is_refused():
    """A frozen feature extractor run under no_grad cuts the input off the graph."""
    model = mlp(4)
    x = leaf(2, 6, seed=4)
    with torch.no_grad():
        h = model[1](model[0](x))
    out = model[2](h)
    with pytest.raises(GraphError, match="not part of the output's graph"):
        dynamiclrp.explain(out, x, target=0)


def test_explain_under_no_grad_equals_outside():
    model = mlp(4)
    x = leaf(2, 6, seed=4)
    out = model(x)
    expected = dynamiclrp.explain(out, x, target=0)
    with torch.no_grad():
        assert torch.equal(dynamiclrp.explain(out, x, target=0), expected)


def test_explain_inside_inference_mode_equals_outside():
    model = mlp(4)
    x = leaf(2, 6, seed=4)
    out = model(x)
    expected = dynamiclrp.explain(out, x, target=0)
    with torch.inference_mode():
        assert torch.equal(dynamiclrp.explain(out, x, target=0), expected)


@pytest.mark.parametrize("how", ["backward", "autograd.grad"])
def test_graph_freed_by_backward_is_refused(how):
    model = mlp(5)
    x = leaf(2, 6, seed=5)
    out = model(x)
    if how == "backward":
        out[:, 0].sum().backward()
    else:
        torch.autograd.grad(out[:, 0].sum(), x)
    with pytest.raises(GraphError, match="retain_graph=True") as err:
        dynamiclrp.explain(out, x, target=0)
    assert "graph was freed" in str(err.value)


def test_graph_kept_with_retain_graph_works():
    model = mlp(5)
    x = leaf(2, 6, seed=5)
    out = model(x)
    out[:, 0].sum().backward(retain_graph=True)
    assert torch.equal(
        dynamiclrp.explain(out, x, target=0), dynamiclrp.explain(model(x), x, target=0)
    )


# --- custom autograd.Function -------------------------------------------------------------------


class Double(torch.autograd.Function):
    """``2 flip(x)`` as a custom Function: an opaque node ``DoubleBackward`` in the graph that
    mixes elements (an element-wise one is probed and explained, ``tests/test_probe.py``)."""

    @staticmethod
    def forward(ctx, a):
        return a.flip(-1) * 2

    @staticmethod
    def backward(ctx, g):
        return g.flip(-1) * 2


def _custom_model(x):
    torch.manual_seed(6)
    model = mlp(6, bias=False)
    return model, lambda a: model[2](model[1](Double.apply(model[0](a))))


def test_custom_function_is_refused_naming_its_node():
    x = leaf(3, 6, seed=6)
    _, f = _custom_model(x)
    with pytest.raises(UncoveredOpError, match="DoubleBackward x1") as err:
        dynamiclrp.explain(f(x), x, target=0)
    assert "Nothing was propagated" in str(err.value)


def test_custom_function_error_says_how_to_register_a_rule():
    x = leaf(3, 6, seed=6)
    _, f = _custom_model(x)
    with pytest.raises(UncoveredOpError, match=r"autograd\.Function[\s\S]*OP_TABLE"):
        dynamiclrp.explain(f(x), x, target=0)


def test_custom_function_with_a_registered_rule_works(monkeypatch):
    """The public way today: an :class:`OpEntry` in ``dynamiclrp.OP_TABLE`` under the node's type
    name.  ``Double`` is linear, so LRP-0 through it equals gradient x input."""
    x = leaf(3, 6, seed=6)
    _, f = _custom_model(x)
    monkeypatch.setitem(
        dynamiclrp.OP_TABLE, "DoubleBackward", OpEntry("routing", lambda c: (c.r.flip(-1),))
    )
    rel = dynamiclrp.explain(f(x), x, target=0, rules=LRP0)
    close_to_oracle(rel, grad_x_input(f, x, 0))
    # a caching explainer reads the entry into its plan once and reuses it
    lrp = dynamiclrp.LRP(LRP0)
    close(lrp.explain(f(x), x, target=0), rel)
    close(lrp.explain(f(x), x, target=0), rel)
    assert lrp.last_plan_cached


# --- full backward hooks ------------------------------------------------------------------------


def test_module_with_a_full_backward_hook_is_explained_without_firing_it():
    model = mlp(7)
    x = leaf(2, 6, seed=7)
    fired = []
    handle = model[2].register_full_backward_hook(lambda *a: fired.append(a))
    try:
        out = model(x)
        rel = dynamiclrp.explain(out, x, target=0)
    finally:
        handle.remove()
    assert fired == []
    assert torch.equal(rel, dynamiclrp.explain(model(x), x, target=0))


# --- tied and shared weights --------------------------------------------------------------------


def test_module_used_twice_matches_gradient_x_input_and_an_untied_copy():
    torch.manual_seed(8)
    shared, head = nn.Linear(6, 6, bias=False).double(), nn.Linear(6, 3, bias=False).double()
    twin = nn.Linear(6, 6, bias=False).double()
    twin.weight.data.copy_(shared.weight.data)
    x = leaf(4, 6, seed=8)

    def tied(a):
        return head(torch.relu(shared(torch.relu(shared(a)))))

    def untied(a):
        return head(torch.relu(twin(torch.relu(shared(a)))))

    close_to_oracle(dynamiclrp.explain(tied(x), x, target=1, rules=LRP0), grad_x_input(tied, x, 1))
    for rules in ("dynamiclrp", "epsilon", "zplus", "gamma"):
        close(
            dynamiclrp.explain(tied(x), x, target=1, rules=rules),
            dynamiclrp.explain(untied(x), x, target=1, rules=rules),
        )


def test_embedding_tied_to_the_lm_head():
    """A tiny LM whose head is the embedding matrix: the relevance of the embedded tokens equals
    gradient x input under LRP-0 and the untied model's under every preset."""
    torch.manual_seed(9)
    emb = nn.Embedding(20, 8).double()
    w1 = nn.Linear(8, 8, bias=False).double()
    untied_head = emb.weight.detach().clone()
    ids = torch.randint(0, 20, (3, 5))

    def lm(h, head):
        return (torch.relu(w1(h)) @ head.T)[:, -1]  # next-token logits (batch, vocab)

    h = emb(ids)
    assert h.grad_fn is not None
    out = lm(h, emb.weight)
    rel = dynamiclrp.explain(out, h, target=4, rules=LRP0)
    close_to_oracle(rel, grad_x_input(lambda a: lm(a, emb.weight.detach()), h, 4))
    for rules in ("dynamiclrp", "epsilon", "attnlrp"):
        h = emb(ids)
        close(
            dynamiclrp.explain(lm(h, emb.weight), h, target=4, rules=rules),
            dynamiclrp.explain(lm(h, untied_head), h, target=4, rules=rules),
        )


# --- in-place ops on views ----------------------------------------------------------------------


def _recorded_matches_gradient_x_input(f, x):
    """LRP-0 of ``f`` at ``x``, its forward pass run under ``record()``, is gradient x input."""
    with dynamiclrp.record() as rec:
        out = f(x)
    rel = dynamiclrp.explain(out, x, target=0, rules=LRP0, recording=rec)
    close_to_oracle(rel, grad_x_input(f, x, 0))


def _inplace_net(op: str):
    model = mlp(10, bias=False)
    v = leaf(3, seed=11)

    def f(a):
        h = model[0](a) * 1.0
        if op == "relu_":
            h[:, 2:7].relu_()
        elif op == "setitem":
            h[:, 0] = v * 3.0
        elif op == "transposed-copy":
            h.t()[1:4].copy_(h.t()[4:7] * 0.5)
        elif op == "mul_":
            h[:, 0:3].mul_(0.5)
        elif op == "add_":
            h.t()[0:3].add_(0.5)
        return model[2](model[1](h))

    return f, v


@pytest.mark.parametrize("op", ["relu_", "setitem", "transposed-copy"])
def test_inplace_copy_or_activation_on_a_view_matches_gradient_x_input(op):
    """Works: ``CopySlices`` routes relevance like the gradient, exact for copies, fills and
    element-wise activations written into a slice."""
    x = leaf(3, 6, seed=10)
    f, v = _inplace_net(op)
    rel = dynamiclrp.explain(f(x), x, target=0, rules=LRP0)
    close_to_oracle(rel, grad_x_input(f, x, 0))


def test_inplace_scaling_on_a_view_by_a_constant_works_and_other_ops_are_refused():
    """``h[:, :3].mul_(0.5)``: routing like the gradient would halve the relevance there (an LRP
    rule passes a rescaling on unchanged), and autograd does not say which op ``CopySlices``
    wraps. The rule checks from the values that the write is the gradient times the old value
    (a constant factor: relevance unchanged); the written value needs the recording here. A
    non-linear in-place op on a view (``tanh_()``) is refused."""
    x = leaf(3, 6, seed=10)
    f, _ = _inplace_net("mul_")
    with pytest.raises(ValueRecoveryError, match=r"CopySlices.*in-place op on a view.*record\("):
        dynamiclrp.explain(f(x), x, target=0, rules=LRP0)
    _recorded_matches_gradient_x_input(f, x)
    model = mlp(10, bias=False)

    def g(a):
        h = model[0](a) * 1.0
        h[:, 0:3].tanh_()
        return model[2](model[1](h))

    with dynamiclrp.record() as rec:
        out = g(x)
    with pytest.raises(UncoveredOpError, match=r"CopySlices[\s\S]*not a multiply by a constant"):
        dynamiclrp.explain(out, x, target=0, rules=LRP0, recording=rec)


def test_inplace_add_of_a_constant_on_a_view_matches_gradient_x_input():
    """``h.t()[0:3].add_(0.5)``: ``CopySlices`` has the gradient of a copy-through there, like a
    ``relu_`` that changed nothing, so the rule compares the values before and after the write
    and splits ``R`` between the old value and the constant like the add rule does. The written
    value comes from the recording (no node saved it here)."""
    x = leaf(3, 6, seed=10)
    f, _ = _inplace_net("add_")
    with pytest.raises(ValueRecoveryError, match=r"CopySlices.*in-place op on a view.*record\("):
        dynamiclrp.explain(f(x), x, target=0, rules=LRP0)
    _recorded_matches_gradient_x_input(f, x)


def test_two_inplace_adds_on_views_of_one_tensor_are_both_recorded():
    """The first write's result is never an op's argument (both views exist before it, and the
    second write changes the tensor before anything reads it): the recording keeps each write's
    base when the write happens."""
    x = leaf(3, 6, seed=10)
    model = mlp(10, bias=False)

    def f(a):
        h = model[0](a) * 1.0
        left, right = h[:, :3], h[:, 5:]  # both views taken before either write
        left.add_(0.5)
        right.sub_(0.25)
        return model[2](model[1](h))

    _recorded_matches_gradient_x_input(f, x)


def test_inplace_identity_like_write_on_a_view_passes_relevance_unchanged():
    """A ``relu_`` on a slice that is positive everywhere has the same gradient as an add; its
    values are unchanged, so it is routed like the gradient (LRP-0 = gradient x input)."""
    x = leaf(3, 6, seed=10)
    model = mlp(10, bias=False)

    def f(a):
        h = model[0](a).abs() + 1.0
        h[:, 2:7].relu_()
        return model[2](model[1](h))

    _recorded_matches_gradient_x_input(f, x)


# --- integer, complex and sparse tensors --------------------------------------------------------


def test_integer_input_is_refused_naming_the_dtype():
    model = mlp(12)
    ids = torch.randint(0, 5, (3, 6))
    with pytest.raises(GraphError, match="torch.int64") as err:
        dynamiclrp.explain(model(ids.double()), ids)
    assert "embedding" in str(err.value)


def test_integer_output_is_refused_naming_the_dtype():
    model = mlp(12)
    x = leaf(3, 6, seed=12)
    with pytest.raises(GraphError, match="torch.int64") as err:
        dynamiclrp.explain(model(x).argmax(1), x)
    assert "target=logits.argmax(1)" in str(err.value)


def test_complex_input_is_refused():
    """Refused, not explained: before the check, a complex input came back as complex relevance
    with imaginary part 0."""
    x = torch.randn(3, 6, dtype=torch.complex128, requires_grad=True)
    with pytest.raises(GraphError, match="complex"):
        dynamiclrp.explain((x * 2).abs(), x)


def test_complex_output_is_refused():
    """Refused, not explained: before the check, the complex seed's imaginary part was discarded
    by a cast further down with only a torch warning."""
    model = mlp(12)
    x = leaf(3, 6, seed=12)
    out = model(x).to(torch.complex128) * (1 + 1j)
    with pytest.raises(GraphError, match="complex") as err:
        dynamiclrp.explain(out, x)
    assert "output.real" in str(err.value) or "output.abs()" in str(err.value)


def test_sparse_output_is_refused_naming_the_layout():
    model = mlp(13)
    x = leaf(3, 6, seed=13)
    with pytest.raises(GraphError, match="sparse") as err:
        dynamiclrp.explain(model(x).to_sparse(), x)
    assert "to_dense()" in str(err.value)


def test_sparse_input_is_refused_naming_the_layout():
    """Refused up front: before the check, it failed inside torch (an op without a SparseCPU
    kernel) with a NotImplementedError."""
    model = mlp(13)
    xs = torch.randn(3, 6, dtype=D).to_sparse().requires_grad_()
    out = torch.sparse.mm(xs, model[0].weight.t())
    with pytest.raises(GraphError, match="sparse") as err:
        dynamiclrp.explain(out, xs)
    assert "to_dense()" in str(err.value)
