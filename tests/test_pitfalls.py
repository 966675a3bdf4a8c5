"""One regression test per applicable item of ../shared/spec/pitfalls.md.

Items covered in other files: recursion on long chains (test_graph.py, test_promises.py), several
paths into one leaf and tied weights (test_traversal.py), a stale cached plan (test_traversal.py),
holding the graph alive and leaving state (test_api.py), the contraction-rule bugs (stride-2
convolutions, the z-plus denominator, gamma beyond 2-D: test_linear_rules.py), masks in softmax and
the SDPA variants (test_rules_attention.py).

Evaluation items: the per-sample probability of the explained class, not dataset accuracy
(test_faithfulness_runner.py::test_lrp_on_a_linear_model_finds_the_evidence_and_scores_its_curves);
pad tokens never ranked or perturbed
(test_evaluation_perturbation.py::test_unrankable_tokens_are_never_perturbed_and_do_not_count);
no hard-coded patch sizes or step counts (they are arguments: the task's ``patch``, ``--steps``;
test_evaluation_perturbation.py::test_patch_pooling_max_and_sum_rank_cells_differently,
::test_steps_grid_rounds_counts_half_up); stated hyperparameters are what ran (the report names
each method's preset, and the presets are compared with their oracles in docs/agreement.md).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynamiclrp
from dynamiclrp import NonFiniteRelevanceError, TargetError
from dynamiclrp.rules import linear

D = torch.float64
EXACT = dynamiclrp.Rules(eps=1e-12)


def leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=D, generator=g).requires_grad_()


# --- graph and traversal ---------------------------------------------------------------------


def test_run_state_is_not_kept_on_nodes_or_classes():
    """Pitfall: metadata written onto AccumulateGrad nodes / class attributes broke second runs
    and second engines. Two explainers with different rules, interleaved, on the same leaf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = leaf(3, 4)
    a, b = dynamiclrp.LRP("epsilon"), dynamiclrp.LRP("zplus")
    ra1 = a.explain(model(x), x, target=0)
    rb1 = b.explain(model(x), x, target=0)
    ra2 = a.explain(model(x), x, target=0)
    rb2 = b.explain(model(x), x, target=0)
    assert torch.equal(ra1, ra2) and torch.equal(rb1, rb2)
    assert not torch.allclose(ra1, rb1)
    assert not any(k.startswith("_dynamiclrp") for k in vars(type(model[0].weight)))


def test_errors_are_raised_not_returned():
    x = leaf(2, 3)
    with pytest.raises(dynamiclrp.DynamicLRPError):
        dynamiclrp.explain(x.detach() * 2, x)


# --- targets ---------------------------------------------------------------------------------


def test_one_dimensional_output_is_not_seeded_at_index_zero():
    x = leaf(5)
    w = torch.randn(3, 5, dtype=D)
    out = w @ x  # 1-D output
    with pytest.raises(TargetError, match="2-D"):
        dynamiclrp.explain(out, x, target=1)
    seed = torch.tensor([0.0, 1.0, 0.0], dtype=D)
    rel = dynamiclrp.explain(w @ x, x, relevance=seed, rules=EXACT)
    expected = x.detach() * w[1] * (1.0 / (w[1] @ x.detach()))
    torch.testing.assert_close(rel, expected)


def test_each_batch_row_gets_its_own_argmax():
    torch.manual_seed(3)
    lin = nn.Linear(4, 5).double()
    x = leaf(6, 4)
    out = lin(x)
    targets = out.argmax(1)
    rel = dynamiclrp.explain(out, x, target=targets, rules=EXACT)
    for i in range(6):
        xi = x[i : i + 1].detach().clone().requires_grad_()
        alone = dynamiclrp.explain(lin(xi), xi, target=int(targets[i]), rules=EXACT)
        torch.testing.assert_close(rel[i : i + 1], alone)


# --- rules -----------------------------------------------------------------------------------


def test_linear_layers_do_not_halve_relevance():
    """Pitfall: an 'AttnLRP mode' gave half of every linear layer's relevance to the weights."""
    x = leaf(3, 4)
    w = nn.Parameter(torch.randn(5, 4, dtype=D))
    out = F.linear(x, w)
    rel = dynamiclrp.explain(out, x, relevance=out.detach(), rules=EXACT)
    torch.testing.assert_close(rel.sum(), out.detach().sum())


def test_x_minus_constant_keeps_all_of_xs_share():
    x = leaf(4, 3)
    c = torch.randn(3, dtype=D)
    y = (x * 2.0) - c  # SubBackward0 with a constant operand that does not require grad
    r = torch.randn(4, 3, dtype=D)
    rel = dynamiclrp.explain(y, x, relevance=r)
    a, b = 2 * x.detach(), -c.expand(4, 3)
    torch.testing.assert_close(rel, r * a.abs() / (a.abs() + b.abs()))


def test_where_routes_by_condition():
    a, b = leaf(6, seed=1), leaf(6, seed=2)
    cond = torch.tensor([True, False, True, True, False, False])
    r = torch.randn(6, dtype=D)
    ra, rb = dynamiclrp.explain(torch.where(cond, a, b), [a, b], relevance=r)
    torch.testing.assert_close(ra, torch.where(cond, r, 0.0))
    torch.testing.assert_close(rb, torch.where(cond, 0.0, r))


def test_sub_log_where_full_sum_and_mean_on_promise_paths():
    """Pitfall: these crashed when a promise passed through them."""
    x = leaf(3, 4)
    p = x.exp()  # saved result: an arg node
    chain = torch.where(p > 1.5, p.log(), p - x * 0.5)  # log / sub / where on the way down
    total = chain.sum() + chain.mean()  # full reductions: promises themselves
    y = total.reshape(1, 1) + (p.sum() * 0.5).reshape(1, 1)  # add: needs total's value
    rel = dynamiclrp.explain(y, x, relevance=torch.ones(1, 1, dtype=D))
    # independent computation of the same rules
    with torch.no_grad():
        pv = x.exp()
        xv = x.detach()
        cv = torch.where(pv > 1.5, pv.log(), pv - xv * 0.5)
        t1, t2 = cv.sum() + cv.mean(), pv.sum() * 0.5
        r_t1 = t1.abs() / (t1.abs() + t2.abs())
        r_t2 = 1 - r_t1
        s, m = cv.sum(), cv.mean()
        r_s, r_m = r_t1 * s.abs() / (s.abs() + m.abs()), r_t1 * m.abs() / (s.abs() + m.abs())
        r_c = cv.abs() * (r_s / cv.abs().sum()) + cv.abs() * (r_m / cv.abs().sum())
        # where routes by condition; log and exp are identity; the sub splits proportionally
        lo = ~(pv > 1.5)
        a, b = pv, -0.5 * xv
        r_sub_a = torch.where(lo, r_c * a.abs() / (a.abs() + b.abs()), 0.0)
        r_sub_b = torch.where(lo, r_c * b.abs() / (a.abs() + b.abs()), 0.0)
        r_p = torch.where(lo, 0.0, r_c) + r_sub_a + pv.abs() * (r_t2 / pv.abs().sum())
    torch.testing.assert_close(rel, r_p + r_sub_b)


def test_constant_first_operand_of_mul():
    x = leaf(5)
    c = torch.randn(5, dtype=D)
    r = torch.randn(5, dtype=D)
    rel = dynamiclrp.explain(c * x, x, relevance=r)
    torch.testing.assert_close(rel, r)


# --- recovering forward values (arg nodes and replays) ----------------------------------------


def _add_with(h_fn, x):
    """out = h + x0 where h must be recovered: the add's rule needs the true value of h."""
    h = h_fn(x)
    other = torch.ones_like(h) * 0.3
    return h + other, h.detach(), other.detach()


@pytest.mark.parametrize(
    "name, h_fn",
    [
        ("maxpool value, not its indices", lambda x: F.max_pool2d(x * 1.0, 2)),
        ("gelu tanh approximation", lambda x: F.gelu(x, approximate="tanh")),
        ("gelu erf", lambda x: F.gelu(x)),
        ("strided slice", lambda x: (x * 1.0)[:, :, ::2, 1::2]),
        ("neg on the chain", lambda x: -(x.exp())),
        ("silu", lambda x: F.silu(x)),
        ("train-mode dropout, value not mask", lambda x: F.dropout(x.exp(), 0.5, training=True)),
    ],
)
def test_recovered_value_is_the_forward_value(name, h_fn):
    torch.manual_seed(0)
    x = leaf(1, 2, 4, 4)
    y, h, other = _add_with(h_fn, x)
    r = torch.randn_like(h)
    rel, report = dynamiclrp.explain(y, x, relevance=r, return_report=True)
    # expected: the add's proportional split with the true h; below h only identity/routing rules,
    # so x's relevance is h's share routed back with the gradient of h (a routing map) or as is.
    r_h = r * h.abs() / (h.abs() + other.abs())
    assert report.promises, name
    # the relevance of h passes back unchanged in total (identity / routing / winner-takes-all)
    torch.testing.assert_close(rel.sum(), r_h.sum(), msg=name)


def test_batchnorm_eval_recovery_uses_running_stats_and_affine():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
        bn.weight.copy_(torch.randn(3))
        bn.bias.copy_(torch.randn(3))
    x = leaf(2, 3, 4, 4)
    h = bn(x)
    y = h + x  # residual: the add needs bn's output
    r = torch.randn_like(h)
    rel = dynamiclrp.explain(y, x, relevance=r, rules=EXACT)
    with torch.no_grad():
        v = lambda t: t.view(1, 3, 1, 1)  # noqa: E731
        scale = v(bn.weight / torch.sqrt(bn.running_var + bn.eps))
        hv = (x - v(bn.running_mean)) * scale + v(bn.bias)
        xv = x.detach()
        r_h = r * hv.abs() / (hv.abs() + xv.abs())
        r_x = r * xv.abs() / (hv.abs() + xv.abs())
        expected = r_x + xv * scale * r_h / hv
    torch.testing.assert_close(rel, expected)


def test_bf16_model_runs_without_a_dtype_argument():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)).to(torch.bfloat16)
    x = torch.randn(2, 4, dtype=torch.bfloat16, requires_grad=True)
    rel = dynamiclrp.explain(model(x), x, target=1)
    assert rel.dtype == torch.bfloat16 and torch.isfinite(rel.float()).all()
    ref_model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)).double()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    xd = x.detach().double().requires_grad_()
    ref = dynamiclrp.explain(ref_model(xd), xd, target=1)
    torch.testing.assert_close(rel.double(), ref, rtol=0.1, atol=0.05)


def test_epsilon_default_is_one_in_a_million():
    assert dynamiclrp.Rules().eps == 1e-6
    for name in dynamiclrp.PRESETS:
        # LxT's Gradient x Input has no stabiliser: its presets use 1e-12 (docs/presets.md);
        # Captum's LRP uses 1e-9
        expected = {"attnlrp": 1e-12, "cp-lrp": 1e-12, "captum": 1e-9}.get(name, 1e-6)
        assert dynamiclrp.preset(name).eps == expected
    z = torch.zeros(2, dtype=D)
    torch.testing.assert_close(linear.stabilize(z, 1e-6), torch.full((2,), 1e-6, dtype=D))


# --- cost ------------------------------------------------------------------------------------


def test_weight_relevance_only_when_asked(monkeypatch):
    calls = []
    original = linear.parameter_relevance

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("dynamiclrp.rules.contraction.parameter_relevance", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = leaf(3, 4)
    dynamiclrp.explain(model(x), x, target=0)
    assert calls == []
    dynamiclrp.explain(model(x), [x, model[2].weight], target=0)
    assert len(calls) == 1


def test_nan_is_reported_with_the_op_that_produced_it():
    """A NaN made inside the graph (a NaN weight on a branch ``where`` discards, so the output is
    finite and passes the up-front checks) is named by the op whose relevance became NaN."""
    x = leaf(2, 3)
    w = torch.full((3, 3), float("nan"), dtype=D)
    masked = torch.where(torch.zeros(2, 3, dtype=torch.bool), x @ w, x * 2.0)
    with pytest.raises(NonFiniteRelevanceError, match="MmBackward0"):
        dynamiclrp.explain(masked, x, relevance=torch.ones(2, 3, dtype=D))


def test_a_nan_output_is_refused_before_propagation():
    x = leaf(2, 3)
    with pytest.raises(dynamiclrp.InputError, match="NaN"):
        dynamiclrp.explain(x * 1.0 + float("nan"), x, relevance=torch.ones(2, 3, dtype=D))
