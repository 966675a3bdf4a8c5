"""record() only where information is truly gone: the SDPA math path's mask add, and the values
the maths allows to rebuild without a recording (oracle: the same model explained with one)."""

import pytest
import torch
import torch.nn.functional as F

import dynamiclrp
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
