"""Replays of the issue-14 entries (docs/rules.md 2.20): each rebuilds its node's forward output
from the input values exactly (the forward chain of a promise)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynamiclrp.rules import OP_TABLE
from dynamiclrp.rules.base import ReplayContext

DT = torch.float64


def _g():
    return torch.Generator().manual_seed(3)


def _r(*shape, grad=True):
    return torch.randn(*shape, generator=_G, dtype=DT).requires_grad_(grad)


_G = _g()
LEN = torch.tensor([2, 0, 3, 1])
CASES = {
    "LogsumexpBackward0": lambda: (
        lambda x: torch.logsumexp(x, (0, 2), keepdim=False),
        [_r(3, 4, 2)],
    ),
    "LogcumsumexpBackward0": lambda: (lambda x: torch.logcumsumexp(x, -1), [_r(3, 4)]),
    "RenormBackward0": lambda: (lambda x: torch.renorm(x, 2.0, 0, 0.5), [_r(3, 4)]),
    "GridSampler2DBackward0": lambda: (
        lambda x, g: F.grid_sample(x, g, "bicubic", "border", align_corners=True),
        [_r(1, 2, 4, 5), _r(1, 3, 3, 2)],
    ),
    "GridSampler3DBackward0": lambda: (
        lambda x, g: F.grid_sample(x, g, align_corners=False),
        [_r(1, 2, 3, 4, 5), _r(1, 2, 2, 2, 3)],
    ),
    "IndexReduceBackward0": lambda: (
        lambda x, s: x.index_reduce(1, torch.tensor([0, 2, 0]), s, "amax", include_self=False),
        [_r(2, 4), _r(2, 3)],
    ),
    "SegmentReduceBackward0": lambda: (
        lambda x: torch._segment_reduce(x, "mean", lengths=LEN, axis=0, initial=1.5),
        [_r(6, 2)],
    ),
    "UnsafeMaskedIndexPutAccumulateBackward0": lambda: (
        lambda x, v: torch.ops.aten._unsafe_masked_index_put_accumulate(
            x, torch.tensor([True, False, True])[:, None], [torch.tensor([1, 7, 1])], v
        ),
        [_r(4, 2), _r(3, 2)],
    ),
    "AsStridedScatterBackward0": lambda: (
        lambda x, s: torch.as_strided_scatter(x, s, (2, 2), (3, 1), 1),
        [_r(3, 3), _r(2, 2)],
    ),
    "TrilinearBackward0": lambda: (
        lambda a, w, b: torch._trilinear(a, w, b, [1, 3], [0], [1, 2], [2, 3]),
        [_r(3, 4), _r(2, 4, 5), _r(3, 5)],
    ),
    "PutBackward0": lambda: (
        lambda x, s: x.put(torch.tensor([1, 4, 1]), s, accumulate=True),
        [_r(2, 3), _r(3)],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_replay_rebuilds_the_output(name: str) -> None:
    f, ins = CASES[name]()
    out = f(*ins)
    fn = out.grad_fn
    assert fn.name() == name
    (got,) = OP_TABLE[name].replay(ReplayContext(fn, [t.detach() for t in ins]))
    torch.testing.assert_close(got, out.detach(), rtol=1e-12, atol=1e-12)
