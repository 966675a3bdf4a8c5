"""record() only where information is truly gone: the SDPA math path's mask add, and the values
the maths allows to rebuild without a recording (oracle: the same model explained with one)."""

import pytest
import torch
import torch.nn.functional as F

import dynamiclrp
from dynamiclrp import ValueRecoveryError
from dynamiclrp.recording import Recording

D = torch.float64


def _qkv():
    torch.manual_seed(3)
    q = torch.randn(4, 3, 8, dtype=D, requires_grad=True)
    wk, wv = torch.randn(8, 8, dtype=D), torch.randn(8, 8, dtype=D)
    k = torch.cat([q, q * 0.5], 1) @ wk  # (4, 6, 8): keys and values depend on q
    v = torch.cat([q * 2.0, q], 1) @ wv
    return q, k, v


@pytest.mark.parametrize("mask", ["float", "bool", "causal"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sdpa_math_path_run_on_unsqueezed_3d_inputs(mask, dropout):
    """A torch build may run 3-D SDPA (e.g. with dropout) as a 4-D call on ``q[None]``: the
    hidden add's input is then ``(1, 4, 3, 6)`` while the rebuild from the 3-D arguments is
    ``(4, 3, 6)``. Simulated here: the 4-D graph, the recording shown the 3-D call's arguments.
    Oracle: the 4-D call recorded as such (the same dropout mask, by the same seed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv()
    kwargs = {
        "float": dict(attn_mask=torch.randn(3, 6, dtype=D)),
        "bool": dict(attn_mask=(torch.rand(3, 6) > 0.4) | torch.eye(3, 6, dtype=torch.bool)),
        "causal": dict(is_causal=True),
    }[mask]
    r = torch.linspace(-1, 2, 4 * 3 * 8, dtype=D).reshape(4, 3, 8)
    rules = dynamiclrp.Rules(eps=1e-12)
    torch.manual_seed(0)
    with dynamiclrp.record() as rec4, sdpa_kernel(SDPBackend.MATH):
        out4 = F.scaled_dot_product_attention(
            q[None], k[None], v[None], dropout_p=dropout, **kwargs
        )
    expected = dynamiclrp.explain(out4, q, relevance=r[None], recording=rec4, rules=rules)

    torch.manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, **kwargs)
    out = out[0]
    rec = Recording()
    rec._keep_sdpa_mask_add(out, (q, k, v), dict(dropout_p=dropout, **kwargs))
    assert len(rec) == 1
    (value,) = rec._values.values()
    assert value.shape == (1, 4, 3, 6)
    rel = dynamiclrp.explain(out, q, relevance=r, recording=rec, rules=rules)
    torch.testing.assert_close(rel, expected, rtol=1e-12, atol=1e-12)


def test_sdpa_3d_with_dropout_under_record_equals_4d():
    """The real call on this torch: 3-D SDPA with dropout (math path) under record()."""
    q, k, v = _qkv()
    mask = torch.randn(3, 6, dtype=D)
    r = torch.linspace(-1, 2, 4 * 3 * 8, dtype=D).reshape(4, 3, 8)
    torch.manual_seed(0)
    with dynamiclrp.record() as rec:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
    torch.manual_seed(0)
    with dynamiclrp.record() as rec4:
        out4 = F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=mask, dropout_p=0.3
        )
    torch.testing.assert_close(out, out4[0], rtol=0, atol=0)
    rel = dynamiclrp.explain(out, q, relevance=r, recording=rec)
    rel4 = dynamiclrp.explain(out4, q, relevance=r[None], recording=rec4)
    torch.testing.assert_close(rel, rel4, rtol=1e-12, atol=1e-12)


# -- masked softmax: the -inf fill rebuilt from the softmax's saved output ------------------------

KEEP = torch.ones(5, 5, dtype=torch.bool).tril()


def _masked_attention(x, w, fill=float("-inf"), log=False, keep=KEEP):
    s = (x @ w) @ x.transpose(-1, -2)
    s = s.masked_fill(~keep, fill)
    p = torch.log_softmax(s, -1).exp() if log else torch.softmax(s, -1)
    return p @ x


def _xw(seed=0):
    torch.manual_seed(seed)
    return torch.randn(2, 5, 4, dtype=D, requires_grad=True), torch.randn(4, 4, dtype=D)


@pytest.mark.parametrize("preset", ["epsilon", "dynamiclrp", "attnlrp"])
@pytest.mark.parametrize("log", [False, True])
def test_masked_softmax_without_record_equals_with_record(preset, log):
    """``x.masked_fill(mask, -inf)`` before a softmax: autograd keeps the mask, not the fill; the
    softmax's saved output is 0 (log-softmax: -inf) on the mask, so the logits are rebuilt.
    Oracle: the same model explained with a recording, which keeps the filled logits."""
    x, w = _xw()
    r = torch.linspace(-1, 2, x.numel(), dtype=D).reshape(x.shape)
    with dynamiclrp.record() as rec:
        out = _masked_attention(x, w, log=log)
    assert len(rec) == 1
    expected, ref_report = dynamiclrp.explain(
        out, x, relevance=r, recording=rec, rules=preset, return_report=True
    )
    got, report = dynamiclrp.explain(
        _masked_attention(x, w, log=log), x, relevance=r, rules=preset, return_report=True
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert report.promises.get("replay", 0) >= 1
    torch.testing.assert_close(report.residual, ref_report.residual)


def test_masked_softmax_with_finfo_min_fill_gives_the_recorded_map():
    """A finite fill whose softmax underflows to 0 (``finfo.min``, as many models write it) gives
    every input the relevance the recording (which keeps finfo.min) gives."""
    x, w = _xw()
    r = torch.linspace(-1, 2, x.numel(), dtype=D).reshape(x.shape)
    fill = torch.finfo(D).min
    with dynamiclrp.record() as rec:
        out = _masked_attention(x, w, fill=fill)
    expected = dynamiclrp.explain(out, x, relevance=r, recording=rec, rules="epsilon")
    got = dynamiclrp.explain(_masked_attention(x, w, fill=fill), x, relevance=r, rules="epsilon")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_masked_softmax_with_a_finite_fill_is_refused():
    x, w = _xw()
    out = _masked_attention(x, w, fill=-1.0)  # the softmax is not 0 on the mask
    with pytest.raises(ValueRecoveryError, match=r"MaskedFillBackward0.*finite value.*record\("):
        dynamiclrp.explain(out, x, relevance=torch.ones_like(out))
    with dynamiclrp.record() as rec:
        out = _masked_attention(x, w, fill=-1.0)
    rel = dynamiclrp.explain(out, x, relevance=torch.ones_like(out), recording=rec)
    assert torch.isfinite(rel).all()


def test_masked_fill_read_by_another_op_is_refused():
    x, w = _xw()
    s = ((x @ w) @ x.transpose(-1, -2)).masked_fill(~KEEP, float("-inf"))
    b = x.sum(-1, keepdim=True) * 0.1  # the add's rule needs s itself
    out = torch.softmax(s, -1) @ x + torch.softmax(s + b, -1) @ x
    with pytest.raises(ValueRecoveryError, match=r"every\s+consumer is a softmax.*reads it"):
        dynamiclrp.explain(out, x, relevance=torch.ones_like(out))


def test_a_cached_plan_checks_the_fill_again():
    """The plan remembers that the value was replayed; the values decide each run anew."""
    x, w = _xw()
    lrp = dynamiclrp.LRP("epsilon")
    out = _masked_attention(x, w)
    lrp.explain(out, x, relevance=torch.ones_like(out))
    out = _masked_attention(x, w, fill=-1.0)
    with pytest.raises(ValueRecoveryError, match="finite value"):
        lrp.explain(out, x, relevance=torch.ones_like(out))
    assert lrp.last_plan_cached


# -- a view we hold keeps its base ----------------------------------------------------------------


@pytest.mark.parametrize("write", ["add", "mul", "set"])
def test_output_view_of_a_written_base_needs_no_recording(write):
    """``h[:, :3].add_(c)`` records CopySlices, whose rule needs h's value after the write; the
    output ``h[:, 1:5]`` is a view whose ``_base`` is h, so that value is at hand.
    Oracle: the recorded run."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    w = torch.randn(4, 6, dtype=D)

    def model():
        h = (x @ w) * 1.0
        if write == "add":
            h[:, :3].add_(0.5)
        elif write == "mul":
            h[:, :3].mul_(0.5)
        else:
            h[:, 0] = 2.0
        return h[:, 1:5]

    r = torch.linspace(-1, 2, 12, dtype=D).reshape(3, 4)
    with dynamiclrp.record() as rec:
        out = model()
    expected = dynamiclrp.explain(out, x, relevance=r, recording=rec, rules="epsilon")
    out = model()
    assert type(out._base.grad_fn).__name__ == "CopySlices"
    got = dynamiclrp.explain(out, x, relevance=r, rules="epsilon")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_failed_replay_in_a_graph_with_unrecorded_constants_suggests_record():
    """A value no replay can rebuild (a nan_to_num output) in a graph with a frozen bias: the error
    also names the unrecorded constant and advises record(model); without one it does not."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 6).double()
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    out = torch.softmax(torch.nan_to_num(lin(x)), -1)
    with pytest.raises(ValueRecoveryError, match="NanToNumBackward0") as plain:
        dynamiclrp.explain(out, x, target=0)
    assert "record(model)" not in str(plain.value)
    lin.requires_grad_(False)
    out = torch.softmax(torch.nan_to_num(lin(x)), -1)
    with pytest.raises(
        ValueRecoveryError, match=r"NanToNumBackward0.*AddmmBackward0.*record\(model\)"
    ):
        dynamiclrp.explain(out, x, target=0)
