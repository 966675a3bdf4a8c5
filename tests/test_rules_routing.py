"""Shape, index and copy ops (``dynamiclrp.rules.routing``), through the engine.

These ops only move, copy, select or duplicate elements, so their LRP rule is ``R_in = J^T R_out``.
The expected value is computed independently with ``torch.autograd.grad`` on a fresh forward pass
of the op (for these linear 0/1 maps the vector-Jacobian product *is* ``J^T R``).

Each op is also checked under a downstream ``+ bias``: the add rule needs the op's forward value,
which the engine rebuilds by replaying the op (a replay that ignores a slice step, a roll shift, a
flip or a padding shows up as a wrong split).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import gen, randn

import dynamiclrp

DT = torch.float64


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def vjp(f, xs: list[torch.Tensor], R: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``J^T R`` of ``f`` at ``xs``, from a fresh forward pass (autograd, not dynamiclrp)."""
    fresh = [x.detach().clone().requires_grad_() for x in xs]
    out = f(*fresh)
    return torch.autograd.grad(out, fresh, R, allow_unused=True)


IDX = torch.tensor([2, 0, 2, 1])
IDX2 = torch.tensor([[0, 1], [2, 2]])
GATHER_IDX = torch.tensor([[0, 0, 3, 1], [2, 1, 1, 0], [3, 3, 0, 2]])
MASK = torch.tensor([[True, False, False, True], [False, False, True, False], [True] * 4])

# name -> f(x) for x of shape (3, 4)
UNARY_ROUTES = {
    "view": lambda x: x.view(2, 6),
    "view_flat": lambda x: x.view(-1),
    "reshape": lambda x: x.reshape(4, 3),
    "reshape_noncontiguous": lambda x: x.t().reshape(-1),
    "flatten": lambda x: x.flatten(),
    "transpose": lambda x: x.transpose(0, 1),
    "t": lambda x: x.t(),
    "mT": lambda x: x.mT,
    "permute": lambda x: x.unsqueeze(0).permute(2, 0, 1),
    "movedim": lambda x: x.movedim(0, -1),
    "expand": lambda x: x[:, :1].expand(3, 5),
    "expand_new_dims": lambda x: x.expand(2, 3, 4),
    "expand_as": lambda x: x[0].expand_as(x),
    "repeat": lambda x: x.repeat(2, 3),
    "repeat_new_dim": lambda x: x.repeat(2, 1, 2),
    "repeat_interleave": lambda x: x.repeat_interleave(2, dim=1),
    "squeeze_dim": lambda x: x.unsqueeze(1).squeeze(1),
    "squeeze_all": lambda x: x[:1].unsqueeze(-1).squeeze(),
    "unsqueeze": lambda x: x.unsqueeze(1),
    "slice": lambda x: x[1:3],
    "slice_step2": lambda x: x[:, ::2],
    "slice_step2_offset": lambda x: x[:, 1::2],
    "slice_step2_rows": lambda x: x[::2, 1:],
    "narrow": lambda x: x.narrow(1, 1, 2),
    "select": lambda x: x[1],
    "select_col": lambda x: x[:, -1],
    "index_tensor": lambda x: x[IDX],
    "index_tensor_col": lambda x: x[:, IDX],
    "index_two_tensors": lambda x: x[IDX2, IDX2.flip(0)],
    "index_bool": lambda x: x[MASK],
    "index_select": lambda x: torch.index_select(x, 1, IDX),
    "gather": lambda x: torch.gather(x, 1, GATHER_IDX),
    "take_along_dim": lambda x: torch.take_along_dim(x, GATHER_IDX[:, :2], 1),
    "masked_fill": lambda x: x.masked_fill(MASK, 0.5),
    "split_piece": lambda x: x.split(2, dim=1)[1],
    "split_sizes_piece": lambda x: x.split([1, 3], dim=1)[1],
    "chunk_piece": lambda x: x.chunk(2, dim=0)[1],
    "unbind_piece": lambda x: x.unbind(1)[2],
    "clone": lambda x: x.clone(),
    "contiguous": lambda x: x.t().contiguous(),
    "pad": lambda x: F.pad(x, (1, 2, 0, 1), value=0.25),
    "pad_crop": lambda x: F.pad(x, (-1, 1)),
    "flip": lambda x: x.flip(1),
    "flip_both": lambda x: x.flip(0, 1),
    "roll": lambda x: x.roll(1, 1),
    "roll_flat": lambda x: x.roll(5),
    "roll_two_dims": lambda x: x.roll((1, -2), (0, 1)),
    "tril": lambda x: x.tril(),
    "triu_offset": lambda x: x.triu(1),
    "diagonal": lambda x: x.diagonal(),
    "unfold": lambda x: x.unfold(1, 2, 1),
    "as_strided": lambda x: x.as_strided((3, 3), (1, 2)),
    "as_strided_overlap": lambda x: x.as_strided((4, 3), (2, 1), 1),
}


def _copy_slices_zero(x):
    y = x.clone()
    y[:, 1] = 0.0
    return y


def _copy_slices_step(x):
    y = x.clone()
    y[::2, ::2] = -1.0
    return y


UNARY_ROUTES["copy_slices_zero"] = _copy_slices_zero
UNARY_ROUTES["copy_slices_step"] = _copy_slices_step

# census (issue 14): node types added from the OpInfo census
# distinct flat indices (3 planes of 8 and of 4 x 4): non-overlapping max pooling's
UNPOOL_IDX = torch.tensor([[[1, 2, 5, 7], [0, 3, 4, 6], [1, 3, 5, 6]]])
SCATTER_MASK = torch.tensor([[True, False, True, False], [False] * 4, [True, True, False, True]])
UNARY_ROUTES.update(
    {
        "view_copy": lambda x: torch.view_copy(x, (2, 6)),
        "permute_copy": lambda x: torch.permute_copy(x.unsqueeze(0), (2, 0, 1)),
        "transpose_copy": lambda x: torch.transpose_copy(x, 0, 1),
        "t_copy": lambda x: torch.t_copy(x),
        "squeeze_copy_dim": lambda x: torch.squeeze_copy(x.unsqueeze(1), 1),
        "squeeze_copy_dims": lambda x: torch.squeeze_copy(x.unsqueeze(1), (1,)),
        "squeeze_copy_all": lambda x: torch.squeeze_copy(x[:1].unsqueeze(-1)),
        "unsqueeze_copy": lambda x: torch.unsqueeze_copy(x, 1),
        "expand_copy": lambda x: torch.expand_copy(x[:, :1], (3, 5)),
        "diagonal_copy": lambda x: torch.diagonal_copy(x, 1),
        "alias_copy": lambda x: torch.alias_copy(x),
        "unbind_copy_piece": lambda x: torch.unbind_copy(x, 1)[2],
        "unfold_copy": lambda x: torch.unfold_copy(x, 1, 2, 1),
        "split_with_sizes_copy_piece": lambda x: torch.split_with_sizes_copy(x, [1, 3], 1)[1],
        "narrow_copy": lambda x: x.narrow_copy(1, 1, 2),
        "squeeze_in_place_dim": lambda x: x.unsqueeze(1).clone().squeeze_(1),
        "squeeze_in_place_all": lambda x: x[:1].unsqueeze(-1).clone().squeeze_(),
        "copy_into_broadcast": lambda x: torch.zeros(2, 3, 4, dtype=DT).copy_(x),
        "zero_": lambda x: (x * 1).zero_(),
        "rot90": lambda x: torch.rot90(x, 1, (0, 1)),
        "rot90_k3": lambda x: torch.rot90(x, -1, (1, 0)),
        "diag_embed": lambda x: torch.diag_embed(x, 1),
        "block_diag": lambda x: torch.block_diag(x, x[:2, 1:]),
        "masked_select": lambda x: torch.masked_select(x, MASK),
        "take": lambda x: torch.take(x, IDX2),
        "select_scatter": lambda x: torch.select_scatter(x, x[2], 0, 1),
        "slice_scatter": lambda x: torch.slice_scatter(x, x[:, :2], 1, 2, 4),
        "diagonal_scatter": lambda x: torch.diagonal_scatter(x, x[0, :3], 0),
        "masked_scatter": lambda x: x.masked_scatter(SCATTER_MASK, x.flip(0)),
        "reflection_pad1d": lambda x: F.pad(x.unsqueeze(0), (2, 1), mode="reflect"),
        "reflection_pad2d": lambda x: F.pad(x.unsqueeze(0), (1, 2, 2, 1), mode="reflect"),
        "reflection_pad3d": lambda x: F.pad(
            x.reshape(1, 1, 3, 2, 2), (1, 1, 1, 0, 2, 1), "reflect"
        ),
        "replication_pad1d": lambda x: F.pad(x.unsqueeze(0), (3, 1), mode="replicate"),
        "replication_pad2d": lambda x: F.pad(x.unsqueeze(0), (1, 3, 4, 1), mode="replicate"),
        "replication_pad3d": lambda x: F.pad(
            x.reshape(1, 1, 3, 2, 2), (2, 1, 0, 1, 3, 1), "replicate"
        ),
        "pixel_shuffle": lambda x: F.pixel_shuffle(x.reshape(1, 4, 1, 3), 2),
        "pixel_unshuffle": lambda x: F.pixel_unshuffle(x.reshape(1, 1, 2, 6), 2),
        "channel_shuffle": lambda x: F.channel_shuffle(x.reshape(1, 4, 3), 2),
        "min_dim": lambda x: x.min(1).values,
        "min_dim_keepdim": lambda x: x.min(0, keepdim=True).values,
        "sort_descending": lambda x: x.sort(1, descending=True).values,
        "sort_stable": lambda x: torch.sort(x, dim=0, stable=True).values,
        "topk": lambda x: x.topk(2, 1).values,
        "topk_smallest_unsorted": lambda x: x.topk(2, 0, largest=False, sorted=False).values,
        "kthvalue": lambda x: x.kthvalue(2, 1).values,
        "kthvalue_keepdim": lambda x: x.kthvalue(3, 0, keepdim=True).values,
        "median_dim": lambda x: x.median(1).values,
        "median_all": lambda x: x.median(),
        "nanmedian_dim": lambda x: x.nanmedian(0, keepdim=True).values,
        "nanmedian_all": lambda x: x.nanmedian(),
        "mode": lambda x: torch.cat([x, x[:, :1]], 1).mode(1).values,
        "cummax": lambda x: x.cummax(1).values,
        "cummin": lambda x: x.cummin(0).values,
        "aminmax_min": lambda x: torch.aminmax(x, dim=1).min,
        "aminmax_max": lambda x: torch.aminmax(x, dim=0, keepdim=True).max,
        "maximum": lambda x: torch.maximum(x, x.flip(1)),
        "minimum": lambda x: torch.minimum(x, x.flip(1)),
        "fmax": lambda x: torch.fmax(x, x.roll(1, 0)),
        "fmin": lambda x: torch.fmin(x, x.roll(1, 1)),
        "clamp_min_tensor": lambda x: torch.clamp_min(x, x.flip(1)),
        "clamp_max_tensor": lambda x: torch.clamp_max(x, x.flip(1).roll(1, 0)),
        "masked_fill_value_tensor": lambda x: x.masked_fill(MASK, x[0, 0]),
        "index_fill": lambda x: x.index_fill(1, IDX[:2], 0.5),
        "index_fill_value_tensor": lambda x: x.index_fill(0, IDX[1:3], x[1, 2]),
        "as_strided_copy": lambda x: torch.as_strided_copy(x, (3, 3), (1, 2)),
        "adaptive_max_pool3d": lambda x: F.adaptive_max_pool3d(x.reshape(1, 1, 3, 2, 2), (2, 1, 2)),
        "max_unpool1d": lambda x: F.max_unpool1d(x.unsqueeze(0), UNPOOL_IDX, 2),
        "max_unpool2d": lambda x: F.max_unpool2d(
            x.reshape(1, 3, 2, 2), UNPOOL_IDX.view(1, 3, 2, 2), 2
        ),
        "index_copy": lambda x: x.index_copy(1, torch.tensor([3, 0]), x[:, 1:3]),
        "put": lambda x: x.put(torch.tensor([5, 0, 11]), x[1, :3]),
        "unsafe_masked_index": lambda x: torch.ops.aten._unsafe_masked_index(
            x, MASK[:, :3], [IDX[:3, None], IDX2[:1, :1] + torch.tensor([[0, 1, 3]])], 0.5
        ),
    }
)


def _route_case(name: str, seed: int = 0):
    g = gen(seed)
    x = randn(g, 3, 4, grad=True)
    f = UNARY_ROUTES[name]
    out = f(x)
    R = randn(g, *out.shape)
    return x, f, out, R


@pytest.mark.parametrize("name", list(UNARY_ROUTES))
def test_route_equals_vector_jacobian_product(name: str) -> None:
    x, f, out, R = _route_case(name)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    (ex,) = vjp(f, [x], R)
    close(rx, ex)
    assert abs(rep.residual) < 1e-10


@pytest.mark.parametrize("name", list(UNARY_ROUTES))
def test_route_value_recovered_for_a_downstream_add(name: str) -> None:
    """``op(x) + bias``: the bias (a Parameter of the output's shape) gets ``|b| / (|op(x)| + |b|)``
    of ``R``; the rest is routed back through the op."""
    x, f, out, R = _route_case(name, seed=1)
    bias = torch.nn.Parameter(randn(gen(2), *out.shape))
    # masked_fill's fill value is not recorded by autograd; as_strided has no replay (autograd
    # does not expose its input's geometry): the recording keeps both results
    with dynamiclrp.record() as rec:
        # scaled so the sum is not at hand: the add recovers f(x) by replaying the route (the
        # replay rule under test), not as y - bias; the scalar product passes R on unchanged
        y = (f(x) + bias) * 1.0
    rx = dynamiclrp.explain(y, x, relevance=R, recording=rec)
    with torch.no_grad():
        fx = f(x)
    r_op = R * fx.abs() / (fx.abs() + bias.detach().abs())
    (ex,) = vjp(f, [x], r_op)
    close(rx, ex)


def test_expand_sums_relevance_of_copies() -> None:
    g = gen(3)
    x, R = randn(g, 3, 1, grad=True), randn(g, 3, 5)
    rx = dynamiclrp.explain(x.expand(3, 5), x, relevance=R)
    close(rx, R.sum(1, keepdim=True))


def test_slice_step_two_by_hand() -> None:
    g = gen(4)
    x, R = randn(g, 2, 7, grad=True), randn(g, 2, 3)
    rx = dynamiclrp.explain(x[:, 1::2], x, relevance=R)
    ex = torch.zeros(2, 7, dtype=DT)
    for j in range(3):
        ex[:, 1 + 2 * j] = R[:, j]
    close(rx, ex)


def test_masked_fill_absorbs_filled_positions() -> None:
    g = gen(5)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    rx, rep = dynamiclrp.explain(x.masked_fill(MASK, 0.5), x, relevance=R, return_report=True)
    close(rx, torch.where(MASK, 0.0, R))
    assert rep.absorbed == pytest.approx(float(R[MASK].sum()), abs=1e-10)
    assert abs(rep.residual) < 1e-10


def test_masked_fill_broadcast_mask() -> None:
    g = gen(6)
    x, R = randn(g, 2, 3, 4, grad=True), randn(g, 2, 3, 4)
    mask = torch.tensor([True, False, False, True])
    rx, rep = dynamiclrp.explain(x.masked_fill(mask, -1.0), x, relevance=R, return_report=True)
    close(rx, torch.where(mask, 0.0, R))
    assert rep.absorbed == pytest.approx(float(R[..., mask].sum()), abs=1e-10)


def test_pad_absorbs_nothing_but_pad_cells() -> None:
    g = gen(7)
    x, R = randn(g, 2, 3, grad=True), randn(g, 4, 6)
    rx, rep = dynamiclrp.explain(
        F.pad(x, (1, 2, 1, 1), value=3.0), x, relevance=R, return_report=True
    )
    close(rx, R[1:3, 1:4])
    assert rep.absorbed == pytest.approx(float(R.sum() - R[1:3, 1:4].sum()), abs=1e-10)


def test_to_dtype() -> None:
    g = gen(8)
    x = randn(g, 3, 4, grad=True)
    out = x.to(torch.float32)
    R = torch.randn(3, 4, generator=g, dtype=torch.float32)
    rx = dynamiclrp.explain(out, x, relevance=R)
    assert rx.dtype == DT
    close(rx, R.to(DT), rtol=1e-6, atol=1e-7)


def test_to_dtype_value_recovered() -> None:
    g = gen(9)
    x = randn(g, 3, 4, grad=True)
    bias = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float32))
    R = torch.randn(3, 4, generator=g, dtype=torch.float32)
    rx = dynamiclrp.explain(x.to(torch.float32) + bias, x, relevance=R)
    fx = x.detach().float()
    close(rx, (R * fx.abs() / (fx.abs() + bias.detach().abs())).to(DT), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["cat", "cat_dim1", "stack", "stack_dim-1"])
def test_multi_input_routes(kind: str) -> None:
    g = gen(10)
    a, b = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    f = {
        "cat": lambda a, b: torch.cat([a, b, a]),
        "cat_dim1": lambda a, b: torch.cat([b, a], dim=1),
        "stack": lambda a, b: torch.stack([a, b]),
        "stack_dim-1": lambda a, b: torch.stack([b, a, b], dim=-1),
    }[kind]
    out = f(a, b)
    R = randn(g, *out.shape)
    (ra, rb), rep = dynamiclrp.explain(out, [a, b], relevance=R, return_report=True)
    ea, eb = vjp(f, [a, b], R)
    close(ra, ea)
    close(rb, eb)
    close(ra.sum() + rb.sum(), R.sum())
    assert abs(rep.residual) < 1e-10


def test_cat_value_recovered_for_a_downstream_add() -> None:
    g = gen(11)
    a, b = randn(g, 2, 3, grad=True), randn(g, 2, 2, grad=True)
    bias = torch.nn.Parameter(randn(g, 5))
    R = randn(g, 2, 5)
    ra, rb = dynamiclrp.explain(torch.cat([a, b], 1) + bias, [a, b], relevance=R)
    z = torch.cat([a, b], 1).detach()
    rz = R * z.abs() / (z.abs() + bias.detach().abs())
    close(ra, rz[:, :3])
    close(rb, rz[:, 3:])


@pytest.mark.parametrize("kind", ["split", "split_sizes", "unbind", "chunk"])
def test_several_outputs_of_one_split_used(kind: str) -> None:
    g = gen(12)
    x = randn(g, 4, 6, grad=True)

    def f(x):
        if kind == "split":
            p = x.split(2, dim=1)
            return torch.cat([p[2], p[0]], 1)
        if kind == "split_sizes":
            p = x.split([1, 3, 2], dim=1)
            return torch.cat([p[1], p[2], p[1]], 1)
        if kind == "unbind":
            p = x.unbind(0)
            return torch.stack([p[3], p[1], p[1]])
        p = x.chunk(3, dim=1)
        return torch.cat([p[1], p[2]], 1)

    out = f(x)
    R = randn(g, *out.shape)
    rx = dynamiclrp.explain(out, x, relevance=R)
    close(rx, vjp(f, [x], R)[0])


def test_copy_slices_with_data_source() -> None:
    """``y = x.clone(); y[:, 1] = z[:, 0]``: the slot written with z routes to z, x loses it."""
    g = gen(13)
    x, z = randn(g, 3, 4, grad=True), randn(g, 3, 2, grad=True)

    def f(x, z):
        y = x.clone()
        y[:, 1] = z[:, 0]
        return y

    out = f(x, z)
    R = randn(g, 3, 4)
    rx, rz = dynamiclrp.explain(out, [x, z], relevance=R)
    ex, ez = vjp(f, [x, z], R)
    close(rx, ex)
    close(rz, ez)
    close(rx.sum() + rz.sum(), R.sum())


def test_copy_slices_in_place_mul_is_identity() -> None:
    """An in-place ``y[:, 0] *= 2`` on a clone is a mul by a constant: identity, like ``2 * x``
    (routing like the gradient would double R). The values before and after the write tell it
    from another op; the recording keeps the written value."""
    g = gen(14)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    with dynamiclrp.record() as rec:
        y = x.clone()
        y[:, 0] *= 2.0
    rx = dynamiclrp.explain(y, x, relevance=R, recording=rec)
    close(rx, R)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    perm_seed=st.integers(0, 1000),
    flip=st.booleans(),
    shift=st.integers(-3, 3),
    seed=st.integers(0, 2**16),
)
def test_bijective_routing_chain_conserves(shape, perm_seed, flip, shift, seed) -> None:
    g = gen(seed)
    perm = torch.randperm(len(shape), generator=gen(perm_seed)).tolist()

    def f(x):
        y = x.permute(perm)
        if flip:
            y = y.flip(0)
        y = y.roll(shift, -1).reshape(-1)
        return y.view(y.numel(), 1).transpose(0, 1)

    x = randn(g, *shape, grad=True)
    out = f(x)
    R = randn(g, *out.shape)
    rx = dynamiclrp.explain(out, x, relevance=R)
    close(rx.sum(), R.sum())
    close(rx, vjp(f, [x], R)[0])


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("shape", [(1, 2, 4), (1, 1, 3, 4), (1, 1, 2, 3, 4)])
def test_nearest_upsampling_routes_and_replays(mode, shape) -> None:
    """Nearest upsampling copies elements (routing); a downstream ``+ bias`` needs its value,
    rebuilt with the recorded output size and scale (2.5 is not reproducible from sizes)."""
    g = gen(30)
    x = randn(g, *shape, grad=True)
    scale = 2.5 if len(shape) < 5 else 2.0
    bias = torch.nn.Parameter(randn(gen(31), 1))
    up = F.interpolate(x.exp(), scale_factor=scale, mode=mode)
    R = randn(g, *up.shape)
    rx = dynamiclrp.explain(up + bias, x, relevance=R)
    u = up.detach()
    share = R * u.abs() / (u.abs() + bias.detach().abs())
    (ex,) = vjp(lambda t: F.interpolate(t, scale_factor=scale, mode=mode), [x], share)
    close(rx, ex)


def test_ratio_by_hand() -> None:
    """``ratio(r, den)``: ``r / den``, 0 where ``den == 0``; an infinite ``den`` gives 0."""
    from dynamiclrp.rules.base import ratio

    r = torch.tensor([1.0, 2.0, 3.0, -4.0])
    den = torch.tensor([0.0, 2.0, float("inf"), 8.0])
    assert ratio(r, den).tolist() == [0.0, 1.0, 0.0, -0.5]


REARRANGING = {
    "view": lambda x: x.view(6, 4),
    "permute": lambda x: x.permute(2, 0, 1),
    "transpose": lambda x: x.transpose(0, 2),
    "clone": lambda x: x.clone(),
    "flip": lambda x: x.flip(1),
    "unsqueeze_squeeze": lambda x: x.unsqueeze(0).squeeze(0),
}


@pytest.mark.parametrize("name", list(REARRANGING))
def test_rearranging_ops_keep_the_books_and_name_the_first_bad_op(name: str) -> None:
    """Rearrangements pass on the sum they received (``OpEntry.rearranges``): the books still
    close exactly, and a NaN made before them is still reported at the op that made it."""
    g = gen(31)
    x = randn(g, 2, 3, 4, grad=True)
    y = REARRANGING[name](x * 2.0)
    rel, rep = dynamiclrp.explain(y, x, return_report=True)
    assert float(rel.sum()) == pytest.approx(float(y.detach().sum()), rel=1e-12)
    assert abs(rep.residual) < 1e-9
    # float32, z = x @ 0 = 0: the epsilon rule's R / stab(0) = 1e37 / 1e-6 overflows, and
    # inf * 0 is NaN, inside the contraction's rule, below the rearrangement
    x32 = x.detach().float().requires_grad_(True)
    z = REARRANGING[name](x32 @ torch.zeros(4, 4))
    with pytest.raises(dynamiclrp.NonFiniteRelevanceError, match="at (Mm|Bmm)Backward0"):
        dynamiclrp.explain(z, x32, relevance=torch.full_like(z, 1e37))


def test_census_writes_that_meet_are_refused() -> None:
    """index_copy with duplicate indices: the gradient reaches every writer though only the last
    write is kept, so routing like it would duplicate relevance: refused (put and max_unpool
    read the winner from the values instead, issue 14 below)."""
    x = randn(gen(60), 3, 4, grad=True)
    f = lambda x: x.index_copy(1, torch.tensor([1, 1]), x[:, 2:])  # noqa: E731
    with pytest.raises(dynamiclrp.UncoveredOpError, match="duplicate indices"):
        dynamiclrp.explain(f(x), x)


@pytest.mark.parametrize(
    "f",
    [
        lambda x, c: torch.select_scatter(x, c[0], 0, 1),
        lambda x, c: torch.slice_scatter(x, c[:, :2], 1, 1, 3),
        lambda x, c: torch.diagonal_scatter(x, c[0, :3]),
        lambda x, c: x.masked_scatter(MASK, c),
        lambda x, c: x.index_fill(1, IDX[:2], c[0, 0]),
        lambda x, c: torch.block_diag(x, c),
    ],
    ids=[
        "select_scatter",
        "slice_scatter",
        "diagonal_scatter",
        "masked_scatter",
        "index_fill",
        "block_diag",
    ],
)
def test_census_constant_written_into_data_needs_and_takes_record(f) -> None:
    """A constant written into ``x``: a consumer that needs the result's value cannot replay it
    (the constant left no trace) and asks for ``record()``, which keeps it; the map then equals
    the one where the constant is a recorded Parameter (its share absorbed either way)."""
    g = gen(61)
    x, c = randn(g, 3, 4, grad=True), randn(g, 3, 4)

    def explained(c, rec=None):
        return dynamiclrp.explain((f(x, c) * 2.0).sum(), x, recording=rec)

    with pytest.raises(dynamiclrp.ValueRecoveryError, match="dynamiclrp.record"):
        explained(c)
    with dynamiclrp.record() as rec:
        out = (f(x, c) * 2.0).sum()
    rx = dynamiclrp.explain(out, x, recording=rec)
    close(rx, explained(torch.nn.Parameter(c.clone())))


# --- issue 14: writes that meet, routed by value; as_strided_scatter; put accumulate -------------

LRP0_ROUTING = dynamiclrp.Rules(name="lrp0", add="signed", reduction="signed", eps=1e-12)


def _true_jacobian_times_input(f, x):
    """``x * (d sum f / d x)`` by finite differences of the forward itself (exact here: ``f`` is
    piecewise constant in which write wins, linear in the values), not autograd's gradient,
    which reaches every writer of a position though only one write is kept."""
    x0 = x.detach()
    base = f(x0).sum()
    grad = torch.zeros_like(x0).reshape(-1)
    h = 1e-6
    for k in range(x0.numel()):
        e = torch.zeros_like(x0).reshape(-1)
        e[k] = h
        grad[k] = (f(x0 + e.view_as(x0)).sum() - base) / h
    return grad.view_as(x0) * x0


def test_put_with_duplicates_routes_to_the_winning_value() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64, requires_grad=True)
    src = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 1, 4, -5])  # position 1 written three times
    out = x.put(idx, src)
    R = torch.arange(1.0, 7.0, dtype=torch.float64)
    rx, rs = dynamiclrp.explain(out, [x, src], relevance=R)
    winner = int((src.detach() == out.detach()[1]).nonzero())
    want_s = torch.zeros(4, dtype=torch.float64)
    want_s[winner] = 2.0
    want_s[2] = 5.0
    torch.testing.assert_close(rs, want_s)
    torch.testing.assert_close(rx, torch.tensor([1.0, 0, 3, 4, 0, 6], dtype=torch.float64))


def test_put_with_duplicates_splits_equal_values_and_lrp0_is_true_gradient_x_input() -> None:
    src = torch.tensor([7.0, 7.0, -2.0], dtype=torch.float64, requires_grad=True)
    x = torch.zeros(4, dtype=torch.float64)
    idx = torch.tensor([2, 2, 0])
    out = x.put(idx, src)
    rs = dynamiclrp.explain(out, src, relevance=torch.tensor([1.0, 0, 4.0, 0], dtype=torch.float64))
    torch.testing.assert_close(rs, torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(5)
    s2 = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    idx2 = torch.tensor([3, 1, 3, 0, 1])
    f = lambda s: torch.zeros(4, dtype=torch.float64).put(idx2, s)  # noqa: E731
    out2 = f(s2)
    lrp0 = dynamiclrp.explain(out2, s2, relevance=out2.detach(), rules=LRP0_ROUTING)
    torch.testing.assert_close(lrp0, _true_jacobian_times_input(f, s2), rtol=1e-6, atol=1e-6)


def test_max_unpool_with_duplicates_routes_to_the_winning_value() -> None:
    x = torch.tensor([[[1.0, 5.0, 2.0, 5.0]]], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[[0, 0, 3, 0]]])
    out = F.max_unpool1d(x, idx, 1, output_size=[4])
    R = torch.tensor([[[6.0, 1.0, 1.0, 3.0]]], dtype=torch.float64)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    # position 0 holds 5.0, written by elements 1 and 3: split evenly; element 0 lost
    torch.testing.assert_close(rx, torch.tensor([[[0.0, 3.0, 3.0, 3.0]]], dtype=torch.float64))
    assert abs(rep.residual) < 1e-12


def test_max_unpool2d_duplicates_lrp0_is_true_gradient_x_input() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[[[0, 5], [5, 9]], [[1, 1], [1, 15]]]])
    f = lambda t: F.max_unpool2d(t, idx, 2, output_size=[4, 4])  # noqa: E731
    out = f(x)
    lrp0 = dynamiclrp.explain(out, x, relevance=out.detach(), rules=LRP0_ROUTING)
    torch.testing.assert_close(lrp0, _true_jacobian_times_input(f, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["both", "base", "src"])
def test_as_strided_scatter_is_routing_not_its_gradient(which) -> None:
    """PyTorch's gradient for ``self`` is the mask of the written positions (gradcheck fails);
    the rule routes ``R`` of the unwritten positions to ``self`` all the same."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    base = base.t().contiguous().requires_grad_(which != "src")
    src = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=which != "base")
    out = torch.as_strided_scatter(base, src, (3,), (2,), 7)
    assert type(out.grad_fn).__name__ == "AsStridedScatterBackward0"
    written = out.detach() == src.detach()[:, None, None]  # (3, 4, 6), one position each
    assert (written.sum((1, 2)) == 1).all()
    R = torch.randn(4, 6, generator=g, dtype=torch.float64)
    ins = [t for t in (base, src) if t.requires_grad]
    rel = dynamiclrp.explain(out, ins, relevance=R)
    rel = rel if isinstance(rel, tuple) else (rel,)
    if which != "src":
        torch.testing.assert_close(rel[0], R.masked_fill(written.any(0), 0))
    if which != "base":
        torch.testing.assert_close(rel[-1], torch.stack([R[w].sum() for w in written]))


@pytest.mark.parametrize("name", ["dynamiclrp", "epsilon"])
def test_put_accumulate_equals_index_put_accumulate(name) -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    src = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 5, 4, -1, 0])
    R = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = dynamiclrp.explain(x.put(idx, src, accumulate=True), [x, src], relevance=R, rules=name)
    spelled = x.reshape(-1).index_put([idx % 12], src, accumulate=True).reshape(3, 4)
    b = dynamiclrp.explain(spelled, [x, src], relevance=R, rules=name)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
