"""The bad-input catalogue: every wrong call raises a specific error that says what to do.

Each entry of :data:`CATALOGUE` is one wrong call, the :mod:`dynamiclrp.errors` class it must
raise and a regex over the actionable part of the message.  ``docs/errors.md`` lists the same
entries (same ids, same error classes); :func:`test_every_entry_is_documented` keeps the two in
step both ways.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp import AlphaBeta, Gamma, Rules, ZBox, errors
from dynamiclrp.errors import (
    DynamicLRPError,
    GraphError,
    InputError,
    RuleParameterError,
    SettingError,
    TargetError,
    ValueRecoveryError,
)

D = torch.float64
DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)).double()


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=D, requires_grad=True)


def explain_mlp(target=None, **kw):
    """``explain`` on a (3, 4) output of a 5-6-4 MLP, with ``x`` as input unless given."""
    model, x = mlp(), leaf(3, 5)
    return dynamiclrp.explain(model(x), kw.pop("inputs", x), target, **kw)


def explain_output(make):
    """``explain(make(model, x), x)``: the output is what ``make`` builds."""
    model, x = mlp(), leaf(3, 5)
    return dynamiclrp.explain(make(model, x), x)


def explain_inputs(inputs):
    """``explain(model(x), inputs(model, x), target=0)``."""
    model, x = mlp(), leaf(3, 5)
    return dynamiclrp.explain(model(x), inputs(model, x), target=0)


def with_values(*shape: int, at: tuple[int, ...], value: float) -> torch.Tensor:
    t = torch.randn(*shape, dtype=D)
    t[at] = value
    return t.requires_grad_()


# --- the calls that need more than one line --------------------------------------------------


def seed_is_inf():
    model, x = mlp(), leaf(3, 5)
    out = model(x) * torch.tensor([float("inf"), 1.0, 1.0, 1.0], dtype=D)
    return dynamiclrp.explain(out, x, target=0)


def output_from_no_grad():
    model, x = mlp(), leaf(3, 5)
    with torch.no_grad():
        out = model(x)
    return dynamiclrp.explain(out, x)


def output_from_inference_mode():
    model, x = mlp(), leaf(3, 5)
    with torch.inference_mode():
        out = model(x)
    return dynamiclrp.explain(out, x)


def output_on_meta():
    lin = nn.Linear(5, 4, device="meta")
    x = torch.randn(3, 5, device="meta", requires_grad=True)
    return dynamiclrp.explain(lin(x), x, target=0)


def empty_batch():
    model, x = mlp(), leaf(0, 5)
    return dynamiclrp.explain(model(x), x)


def input_sparse():
    xs = torch.randn(3, 5, dtype=D).to_sparse().requires_grad_()
    w = torch.randn(4, 5, dtype=D, requires_grad=True)
    return dynamiclrp.explain(torch.sparse.mm(xs, w.t()), xs, target=0)


def input_complex():
    z = torch.randn(3, 5, dtype=torch.complex128, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.complex128)
    return dynamiclrp.explain((z @ w).real, z)


def input_with_nan():
    model, x = mlp(), with_values(3, 5, at=(0, 0), value=float("nan"))
    return dynamiclrp.explain(model(x), x, target=0)


def second_input_with_nan():
    model, x = mlp(), leaf(3, 5)
    b = with_values(3, 5, at=(2, 1), value=float("nan"))
    return dynamiclrp.explain(model(x + b), [x, b], target=0)


def graph_freed_by_backward():
    model, x = mlp(), leaf(3, 5)
    out = model(x)
    out[:, 0].sum().backward()
    return dynamiclrp.explain(out, x, target=0)


def graph_modified_in_place():
    x = leaf(3, 5)
    a = x * 2.0
    out = a.sin()
    with torch.no_grad():
        a.add_(1.0)
    return dynamiclrp.explain(out, x)


def recording_still_active():
    model, x = mlp(), leaf(3, 5)
    with dynamiclrp.record() as rec:
        out = model(x)
        return dynamiclrp.explain(out, x, target=0, recording=rec)


def masked_scores(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A constant added to a product, then softmax: nothing keeps the sum, so the softmax rule's
    logits must come from a recording."""
    return (x @ w + torch.linspace(-1.0, 1.0, 4, dtype=D)).softmax(-1)


def recording_of_another_pass():
    x, w = leaf(3, 4), leaf(4, 4)
    with dynamiclrp.record() as rec:
        masked_scores(x, w)
    return dynamiclrp.explain(masked_scores(x, w), x, target=0, recording=rec)


def override_unknown_name():
    model = mlp()
    return dynamiclrp.preset("epsilon").override(Gamma(), names=["0.wieght"], model=model)


# --- the catalogue ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], object]
    error: type[DynamicLRPError]
    match: str


CATALOGUE = [
    # target= and relevance=
    Case("target-float", lambda: explain_mlp(1.5), TargetError, r"got the float 1\.5"),
    Case("target-integral-float", lambda: explain_mlp(2.0), TargetError, r"ints \(target=2\)"),
    Case("target-bool", lambda: explain_mlp(True), TargetError, r"not a bool.*e\.g\. target=1"),
    Case("target-string", lambda: explain_mlp("cat"), TargetError, r"label2id\[label\]"),
    Case("target-too-large", lambda: explain_mlp(4), TargetError, r"out of range.*use 0\.\.3"),
    Case("target-too-negative", lambda: explain_mlp(-5), TargetError, r"-4\.\.-1 from the end"),
    Case(
        "target-list-length",
        lambda: explain_mlp([0, 1]),
        TargetError,
        r"2 entries but the output has 3 rows: give one class per batch row",
    ),
    Case(
        "target-list-not-int",
        lambda: explain_mlp([0, 1.0, 2]),
        TargetError,
        r"holds float 1\.0: convert the entries to int",
    ),
    Case(
        "target-tensor-2d",
        lambda: explain_mlp(torch.tensor([[0], [1], [2]])),
        TargetError,
        r"got shape \(3, 1\): flatten it, e\.g\. target\.view\(-1\)",
    ),
    Case(
        "target-tensor-float",
        lambda: explain_mlp(torch.tensor([0.0, 1.0, 2.0])),
        TargetError,
        r"1-D integer tensor.*pass target\.long\(\)",
    ),
    Case(
        "target-output-1d",
        lambda: (lambda m, x: dynamiclrp.explain(m(x)[0], x, target=1))(mlp(), leaf(3, 5)),
        TargetError,
        r"output\.unsqueeze\(0\)",
    ),
    Case(
        "target-output-3d",
        lambda: (lambda m, x: dynamiclrp.explain(m(x), x, target=1))(mlp(), leaf(2, 3, 5)),
        TargetError,
        r"needs a 2-D \(batch, classes\) output.*logits\[:, -1\]",
    ),
    Case(
        "target-and-relevance",
        lambda: explain_mlp(1, relevance=torch.ones(3, 4)),
        TargetError,
        r"either target= or relevance=, not both",
    ),
    Case(
        "relevance-shape",
        lambda: explain_mlp(relevance=torch.ones(3, 1)),
        TargetError,
        r"shape \(3, 1\) but the output has shape \(3, 4\).*r\.expand_as\(output\)",
    ),
    Case(
        "relevance-not-tensor",
        lambda: explain_mlp(relevance=[[1.0] * 4] * 3),
        TargetError,
        r"got a list of 3 item\(s\): convert it, e\.g\. relevance=torch\.as_tensor",
    ),
    Case(
        "relevance-nan",
        lambda: explain_mlp(relevance=torch.full((3, 4), float("nan"))),
        TargetError,
        r"12 NaN or Inf value\(s\).*torch\.nan_to_num",
    ),
    Case("seed-inf", seed_is_inf, TargetError, r"3 NaN or Inf.*Explain a finite quantity"),
    # output
    Case(
        "output-tuple",
        lambda: explain_output(lambda m, x: (m(x),)),
        InputError,
        r"got a tuple of 1 item\(s\): pass one tensor of it, e\.g\. output\[0\]",
    ),
    Case(
        "output-model-output",
        lambda: explain_output(lambda m, x: types.SimpleNamespace(logits=m(x))),
        InputError,
        r"e\.g\. output\.logits",
    ),
    Case(
        "output-numpy",
        lambda: explain_output(lambda m, x: m(x).detach().numpy()),
        InputError,
        r"a NumPy array has no autograd graph: pass the tensor the model returned",
    ),
    Case("output-no-grad", output_from_no_grad, GraphError, r"not under torch\.no_grad\(\)"),
    Case(
        "output-inference-mode",
        output_from_inference_mode,
        GraphError,
        r"inference tensor.*Run the forward pass with autograd recording",
    ),
    Case(
        "output-detached",
        lambda: explain_output(lambda m, x: m(x).detach()),
        GraphError,
        r"no grad_fn.*do not \.detach\(\) the output",
    ),
    Case(
        "output-leaf",
        lambda: explain_output(lambda m, x: x),
        InputError,
        r"leaf tensor.*pass what the model returned, e\.g\. explain\(model\(x\), x\)",
    ),
    Case(
        "output-integer",
        lambda: explain_output(lambda m, x: m(x).argmax(1)),
        InputError,
        r"torch\.int64.*explain\(logits, x, target=logits\.argmax\(1\)\)",
    ),
    Case(
        "output-complex",
        lambda: explain_output(lambda m, x: torch.fft.fft(m(x))),
        InputError,
        r"complex.*output\.abs\(\) or output\.real",
    ),
    Case(
        "output-nan",
        lambda: explain_output(lambda m, x: m(x) * float("nan")),
        InputError,
        r"output has 12 NaN value\(s\).*detect_anomaly",
    ),
    Case(
        "output-sparse",
        lambda: explain_output(lambda m, x: m(x).to_sparse()),
        InputError,
        r"layout torch\.sparse_coo.*output\.to_dense\(\)",
    ),
    Case("output-empty", empty_batch, InputError, r"shape \(0, 4\).*Skip empty batches"),
    Case(
        "output-meta",
        output_on_meta,
        InputError,
        r"meta device.*run the\s+forward pass again",
    ),
    # inputs
    Case(
        "inputs-empty",
        lambda: explain_inputs(lambda m, x: []),
        InputError,
        r"inputs is empty: pass the tensor\(s\) to explain",
    ),
    Case("inputs-none", lambda: explain_inputs(lambda m, x: None), InputError, r"inputs is None"),
    Case(
        "inputs-numpy",
        lambda: explain_inputs(lambda m, x: x.detach().numpy()),
        InputError,
        r"torch\.as_tensor\(a\)\.requires_grad_\(\)",
    ),
    Case(
        "inputs-list-of-numpy",
        lambda: explain_inputs(lambda m, x: [x.detach().numpy()]),
        InputError,
        r"inputs\[0\] is a ndarray.*torch\.as_tensor\(a\)\.requires_grad_\(\)",
    ),
    Case(
        "inputs-module",
        lambda: explain_inputs(lambda m, x: m),
        InputError,
        r"list\(model\.parameters\(\)\)",
    ),
    Case(
        "inputs-dict",
        lambda: explain_inputs(lambda m, x: {"x": x}),
        InputError,
        r"list\(d\.values\(\)\)",
    ),
    Case(
        "inputs-none-entry",
        lambda: explain_inputs(lambda m, x: [x, None]),
        InputError,
        r"inputs\[1\] is NoneType None, not a tensor",
    ),
    Case(
        "input-integer",
        lambda: explain_inputs(lambda m, x: torch.ones(3, dtype=torch.long)),
        InputError,
        r"torch\.int64 \(token ids.*inputs_embeds=",
    ),
    Case(
        "input-sparse",
        input_sparse,
        InputError,
        r"inputs has layout torch\.sparse_coo.*a\.to_dense\(\)\.requires_grad_\(\)",
    ),
    Case("input-complex", input_complex, InputError, r"explain the real tensors"),
    Case(
        "input-no-grad",
        lambda: explain_inputs(lambda m, x: x.detach()),
        InputError,
        r"does not require grad.*Call \.requires_grad_\(\) on it before the forward pass",
    ),
    Case(
        "input-not-in-graph",
        lambda: explain_inputs(lambda m, x: leaf(3, 5)),
        GraphError,
        r"not part of the output's graph",
    ),
    Case(
        "input-detached-copy",
        lambda: explain_inputs(lambda m, x: x.detach().requires_grad_()),
        GraphError,
        r"not part of the output's graph",
    ),
    Case(
        "input-twice",
        lambda: explain_inputs(lambda m, x: [x, m[0].weight, x]),
        InputError,
        r"inputs\[2\] is the same tensor as inputs\[0\].*pass each tensor once",
    ),
    Case(
        "input-nan",
        input_with_nan,
        InputError,
        r"inputs \(shape \(3, 5\)\) has 1 NaN value\(s\) \(first at index \(0, 0\)\)"
        r".*torch\.nan_to_num",
    ),
    Case(
        "input-nan-second",
        second_input_with_nan,
        InputError,
        r"inputs\[1\] \(shape \(3, 5\)\) has 1 NaN value\(s\) \(first at index \(2, 1\)\)",
    ),
    # the graph
    Case(
        "graph-freed",
        graph_freed_by_backward,
        GraphError,
        r"was freed.*call explain\(\) before any backward\(\).*retain_graph=True",
    ),
    Case(
        "graph-modified-in-place",
        graph_modified_in_place,
        GraphError,
        r"modified in place.*run the forward pass again",
    ),
    # recording=
    Case(
        "recording-wrong-type",
        lambda: explain_mlp(0, recording=True),
        SettingError,
        r"must be what dynamiclrp\.record\(\) returns",
    ),
    Case(
        "recording-still-active",
        recording_still_active,
        SettingError,
        r"Call explain\(\) after the block",
    ),
    Case(
        "recording-another-pass",
        recording_of_another_pass,
        ValueRecoveryError,
        r"forward\s+pass other than the one recorded",
    ),
    # rules= and presets
    Case(
        "preset-unknown",
        lambda: dynamiclrp.LRP("epsilonn"),
        SettingError,
        r"Did you mean 'epsilon'\?",
    ),
    Case(
        "preset-wrong-case",
        lambda: dynamiclrp.explain(*(lambda m, x: (m(x), x))(mlp(), leaf(3, 5)), rules="Gamma"),
        SettingError,
        r"Did you mean 'gamma'\?",
    ),
    Case(
        "rules-wrong-type",
        lambda: dynamiclrp.LRP(42),
        SettingError,
        r"rules= must be a preset name \(.*epsilon.*\) or a dynamiclrp\.Rules",
    ),
    Case(
        "rules-a-rule",
        lambda: dynamiclrp.LRP(Gamma(0.25)),
        SettingError,
        r"rules=dynamiclrp\.Rules\(dense=Gamma\(gamma=0\.25\), conv=Gamma",
    ),
    Case(
        "rules-a-rule-class",
        lambda: dynamiclrp.LRP(ZBox),
        SettingError,
        r"the rule class ZBox.*rules=dynamiclrp\.Rules\(dense=ZBox\(\.\.\.\)",
    ),
    Case(
        "rules-field-string",
        lambda: Rules(dense="gamma"),
        RuleParameterError,
        r"takes a rule object: Epsilon\(\), Gamma\(0\.25\)",
    ),
    Case(
        "rules-field-class",
        lambda: Rules(conv=Gamma),
        RuleParameterError,
        r"Rules\.conv is the class Gamma.*e\.g\. Gamma\(\)",
    ),
    Case(
        "rules-field-not-a-rule",
        lambda: Rules(first=3),
        RuleParameterError,
        r"Rules\.first must be a rule object",
    ),
    Case(
        "rules-eps-zero",
        lambda: Rules(eps=0),
        SettingError,
        r"eps must be positive.*1e-6",
    ),
    Case("rules-eps-nan", lambda: Rules(eps=float("nan")), SettingError, r"must be finite"),
    Case(
        "rules-eps-string",
        lambda: Rules(eps="1e-6"),
        SettingError,
        r"Rules\.eps must be a real number, got str '1e-6': pass the number itself",
    ),
    Case(
        "rules-choice",
        lambda: Rules(add="sum"),
        SettingError,
        r"Rules\.add must be one of \('proportional', 'signed'\)",
    ),
    Case(
        "rules-first-kinds-string",
        lambda: Rules(first_kinds="conv"),
        SettingError,
        r"first_kinds=\('conv',\)",
    ),
    Case(
        "rules-first-kinds-unknown",
        lambda: Rules(first_kinds=("bmm",)),
        SettingError,
        r"first_kinds must be among .*convolutions \(.conv.,\) or both",
    ),
    Case(
        "override-no-layers",
        lambda: dynamiclrp.preset("epsilon").override(Gamma()),
        SettingError,
        r"needs params= or names=.*params=\[model\.conv1\.weight\]",
    ),
    Case(
        "override-names-without-model",
        lambda: dynamiclrp.preset("epsilon").override(Gamma(), names="0.weight"),
        SettingError,
        r"needs model= to look the names up",
    ),
    Case(
        "override-unknown-name",
        override_unknown_name,
        SettingError,
        r"No parameters named \['0\.wieght'\].*model\.named_parameters\(\)",
    ),
    Case(
        "override-rule-string",
        lambda: dynamiclrp.preset("epsilon").override("gamma", params=[torch.ones(2)]),
        RuleParameterError,
        r"override\(rule\)='gamma' is a string",
    ),
    Case(
        "override-params-not-tensors",
        lambda: dynamiclrp.preset("epsilon").override(Gamma(), params=["0.weight"]),
        SettingError,
        r"names=\['conv1\.weight'\] with model=model",
    ),
    # LRP(cache_size=)
    Case(
        "cache-size-negative",
        lambda: dynamiclrp.LRP(cache_size=-1),
        SettingError,
        r"cache_size must be an int >= 0.*got -1",
    ),
    Case(
        "cache-size-not-int",
        lambda: dynamiclrp.LRP(cache_size=1.5),
        SettingError,
        r"cache_size must be an int >= 0.*0 disables",
    ),
    # rule parameters
    Case("gamma-negative", lambda: Gamma(-0.5), RuleParameterError, r">= 0.*0\.25 is usual"),
    Case("gamma-nan", lambda: Gamma(float("nan")), RuleParameterError, r"must be finite"),
    Case("gamma-inf", lambda: Gamma(float("inf")), RuleParameterError, r"must be finite"),
    Case("gamma-string", lambda: Gamma("0.25"), RuleParameterError, r"must be a real number"),
    Case(
        "alphabeta-not-conservative",
        lambda: AlphaBeta(1.0, 1.0),
        RuleParameterError,
        r"alpha - beta = 1.*AlphaBeta\(2, 1\)",
    ),
    Case(
        "alphabeta-negative-beta",
        lambda: AlphaBeta(0.5, -0.5),
        RuleParameterError,
        r"beta=\.\.\.\) must be >= 0.*AlphaBeta\(1, 0\)",
    ),
    Case(
        "alphabeta-nan",
        lambda: AlphaBeta(float("nan"), 1.0),
        RuleParameterError,
        r"AlphaBeta\(alpha=\.\.\.\) must be finite",
    ),
    Case(
        "zbox-low-above-high",
        lambda: ZBox(1.0, 0.0),
        RuleParameterError,
        r"low <= high.*swap them",
    ),
    Case(
        "zbox-tensor-low-above-high",
        lambda: ZBox(torch.zeros(1, 3, 1, 1), torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)),
        RuleParameterError,
        r"low > high in 1 place\(s\)",
    ),
    Case(
        "zbox-shapes",
        lambda: ZBox(torch.zeros(3), torch.ones(4)),
        RuleParameterError,
        r"do not broadcast together.*\(1, 3, 1, 1\)",
    ),
    Case(
        "zbox-nan",
        lambda: ZBox(torch.tensor([0.0, float("nan")]), 1.0),
        RuleParameterError,
        r"ZBox\(low=\.\.\.\) holds NaN or Inf",
    ),
    Case("zbox-string", lambda: ZBox("0", 1.0), RuleParameterError, r"must be a real number"),
    # coverage() shares explain()'s checks
    Case(
        "coverage-bad-inputs",
        lambda: (lambda m, x: dynamiclrp.coverage(m(x), [x, x]))(mlp(), leaf(3, 5)),
        InputError,
        r"pass each tensor once",
    ),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_wrong_call_raises_a_specific_error_that_says_what_to_do(case: Case):
    with pytest.raises(case.error, match=case.match) as err:
        case.call()
    assert isinstance(err.value, DynamicLRPError)
    # the exact class, not a subclass or a sibling that happens to match
    assert type(err.value) is case.error, type(err.value)


def test_catalogue_ids_are_unique_and_enough():
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 35


def _doc_rows() -> dict[str, str]:
    """``id -> error class`` from the table rows of docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|(.*)", line)
        if m:
            cells = [c.strip() for c in m.group(2).split("|")]
            assert m.group(1) not in rows, f"{m.group(1)} listed twice in docs/errors.md"
            rows[m.group(1)] = cells[1].strip("`")
    return rows


def test_every_entry_is_documented():
    rows = _doc_rows()
    expected = {c.id: c.error.__name__ for c in CATALOGUE}
    assert sorted(set(expected) - set(rows)) == [], "in the catalogue but not in docs/errors.md"
    assert sorted(set(rows) - set(expected)) == [], "in docs/errors.md but not in the catalogue"
    wrong = {k: (rows[k], v) for k, v in expected.items() if rows[k] != v}
    assert wrong == {}, "docs/errors.md names another error class (doc, test)"


def test_hierarchy_in_the_docs_lists_every_error_class():
    text = DOC.read_text()
    classes = [
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, DynamicLRPError)
    ]
    assert len(classes) >= 9
    assert [c for c in classes if c not in text] == []


def test_error_classes_keep_their_standard_bases():
    """``except ValueError`` keeps catching what it caught before the specific classes."""
    assert issubclass(InputError, GraphError) and issubclass(InputError, ValueError)
    assert issubclass(RuleParameterError, SettingError) and issubclass(SettingError, ValueError)
    assert issubclass(TargetError, ValueError)


# --- the right calls next to the wrong ones still work ---------------------------------------


def test_numpy_integer_targets_are_accepted_and_equal_int_targets():
    model, x = mlp(), leaf(3, 5)
    out = model(x)
    reference = dynamiclrp.explain(out, x, target=[2, 0, 1])
    for target in (np.array([2, 0, 1]), torch.tensor([2, 0, 1]), [np.int64(2), 0, 1]):
        torch.testing.assert_close(dynamiclrp.explain(out, x, target=target), reference)
    torch.testing.assert_close(
        dynamiclrp.explain(out, x, target=np.int64(3)), dynamiclrp.explain(out, x, target=3)
    )


def test_inf_off_the_target_is_allowed():
    """A masked logit of -inf that is not explained does not stop the explanation: the seed is
    zero there, and the relevance equals that of the unmasked output."""
    model, x = mlp(), leaf(3, 5)
    out = model(x)
    mask = torch.tensor([0.0, 0.0, float("-inf"), 0.0], dtype=D)
    masked = dynamiclrp.explain(out + mask, x, target=1)
    plain = dynamiclrp.explain(model(x), x, target=1)
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked, plain)


def test_inf_in_an_input_is_allowed():
    """An intermediate input may hold -inf (masked attention scores): the softmax rule gives those
    positions relevance zero, so the check rejects NaN only."""
    x, w = leaf(3, 4), leaf(4, 4)
    scores = (x @ w).masked_fill(torch.eye(3, 4, dtype=torch.bool), float("-inf"))
    rel = dynamiclrp.explain(scores.softmax(-1), scores, target=1)
    assert torch.isfinite(rel).all()
    assert (rel[torch.eye(3, 4, dtype=torch.bool)] == 0).all()


def test_explaining_the_same_output_twice_gives_the_same_relevance():
    model, x = mlp(), leaf(3, 5)
    out = model(x)
    first = dynamiclrp.explain(out, x, target=0)
    torch.testing.assert_close(dynamiclrp.explain(out, x, target=0), first, rtol=0, atol=0)


def test_an_empty_input_next_to_others_gets_an_empty_relevance():
    model, x = mlp(), leaf(3, 5)
    empty = leaf(0)
    rel_x, rel_empty = dynamiclrp.explain(model(x) + empty.sum(), [x, empty], target=0)
    assert rel_empty.shape == (0,) and rel_x.shape == x.shape


def test_graph_kept_with_retain_graph_can_be_explained():
    model, x = mlp(), leaf(3, 5)
    out = model(x)
    out.sum().backward(retain_graph=True)
    torch.testing.assert_close(
        dynamiclrp.explain(out, x, target=0), dynamiclrp.explain(model(x), x, target=0)
    )


def test_override_takes_a_single_parameter_or_name():
    model = mlp()
    by_list = dynamiclrp.preset("epsilon").override(Gamma(), params=[model[0].weight])
    by_tensor = dynamiclrp.preset("epsilon").override(Gamma(), params=model[0].weight)
    by_name = dynamiclrp.preset("epsilon").override(Gamma(), names="0.weight", model=model)
    keys = [r.overrides[0].keys for r in (by_list, by_tensor, by_name)]
    assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 1


def test_valid_rule_parameters_are_kept():
    assert Gamma(np.float32(0.5)).gamma == 0.5
    assert (AlphaBeta(1, 0).alpha, AlphaBeta(1, 0).beta) == (1.0, 0.0)
    box = ZBox(torch.zeros(1, 3, 1, 1), 1.0)
    assert box.high == 1.0 and box.low.shape == (1, 3, 1, 1)
    assert Rules(first_kinds=["conv"]).first_kinds == ("conv",)
    assert dynamiclrp.LRP(cache_size=np.int64(2)).cache_size == 2
