"""Minimal reproductions of the failures that the fuzz (tests/test_fuzz.py) finds for issue 14.

Not collected by pytest (no ``test_`` prefix): run ``PYTHONPATH=src python tests/issue14_repros.py``
to see, for each, what it checks, the measured value and ``ok`` or ``FAILS``.  The oracles are
independent of the code under test: autograd's gradient x input for LRP-0 (``"epsilon"`` at
``eps = 1e-12``, float64) on piecewise-affine functions, the map of an equivalent spelling, the
bias's share ``sum b`` for the books, and the absence of an error where the expansion of the
same op is explained.  docs/fuzzing.md lists the same numbers; ``tests/test_fuzz.py`` runs
:func:`main` and fails on any ``FAILS`` line.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import dynamiclrp

DT = torch.float64
LRP0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)


def gxi_error(f, x: torch.Tensor, recorded: bool = False) -> float:
    """max |LRP-0 - gradient x input| / max |gradient x input|, target 0 of every row."""
    with dynamiclrp.record() as rec:
        out = f()
    rel = dynamiclrp.explain(out, x, target=0, rules=LRP0, recording=rec if recorded else None)
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    expected = g * x.detach()
    return float((rel - expected).abs().max() / expected.abs().max())


def spelling_error(f, g, x: torch.Tensor, preset: str) -> float:
    """max |map(f) - map(g)| / max |map(g)| under ``preset``."""
    a = dynamiclrp.explain(f(), x, target=0, rules=preset)
    b = dynamiclrp.explain(g(), x, target=0, rules=preset)
    return float((a - b).abs().max() / b.abs().max())


def explains(f, x: torch.Tensor, recorded: bool) -> str:
    """``"ok"`` or the error's class and the start of its message."""
    with dynamiclrp.record() as rec:
        out = f()
    try:
        dynamiclrp.explain(out, x, target=0, rules="epsilon", recording=rec if recorded else None)
    except dynamiclrp.DynamicLRPError as e:
        return f"{type(e).__name__}: {str(e)[:400]}"
    return "ok"


FAILED: list[str] = []


def report(name: str, value, ok: bool) -> None:
    print(f"{'ok   ' if ok else 'FAILS'} {name}: {value}")
    if not ok:
        FAILED.append(f"{name}: {value}")


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)
    W = nn.Parameter(torch.randn(4, 2, generator=g, dtype=DT))
    c = torch.randn(3, 2, generator=g, dtype=DT)  # y_obs: a constant
    Wc = nn.Parameter(torch.randn(2, 1, 2, generator=g, dtype=DT))  # conv1d, no bias
    c6 = torch.randn(3, 6, generator=g, dtype=DT)

    # 1. bias fusion: a constant on the left of sub, or alpha != 1, above a bias-free contraction
    for name, f in [
        ("c - x @ W", lambda: c - x @ W),
        ("torch.add(c, x @ W, alpha=2)", lambda: torch.add(c, x @ W, alpha=2.0)),
        ("torch.add(c, x @ W, alpha=-1)", lambda: torch.add(c, x @ W, alpha=-1.0)),
        ("torch.sub(c, x @ W, alpha=2)", lambda: torch.sub(c, x @ W, alpha=2.0)),
        (
            "c6 - conv1d(x).flatten(1) (no bias)",
            lambda: c6 - F.conv1d(x[:, None], Wc).flatten(1),
        ),
        ("control: x @ W - c", lambda: x @ W - c),
    ]:
        e = gxi_error(f, x)
        report(f"1 LRP-0 vs grad x input, {name}", f"{e:.1e}", e < 1e-6)

    # 2. torch.rsub with a tensor: RsubBackward0 has no op-table entry
    r = explains(lambda: torch.rsub(x, c[0, :1]), x, True)
    report("2 torch.rsub(x, c), record()", r, r == "ok")

    # 3. 0.5 - h: RsubBackward1's identity rule gives the scalar no share
    V = nn.Parameter(torch.randn(2, 4, generator=g, dtype=DT))
    for name, f in [
        ("linear(0.5 - x)", lambda: F.linear(0.5 - x, V)),
        ("control: linear(-(x - 0.5))", lambda: F.linear(-(x - 0.5), V)),
    ]:
        e = gxi_error(f, x, recorded=True)
        if name.startswith("control"):
            report(f"3 LRP-0 vs grad x input, {name}", f"{e:.1e}", e < 1e-6)
        else:  # a known deviation (docs/rules.md 2.5): the identity rule of c - x stays for now
            report(f"3 LRP-0 vs grad x input, {name} (known deviation)", f"{e:.1e}", e > 1e-3)

    # 4. token weights (data) times an nn.Embedding output: linear in the weights
    emb = nn.Embedding(7, 3).double()
    ids = torch.tensor([[1, 4], [2, 2], [6, 0]])
    w = torch.randn(3, 2, generator=g, dtype=DT, requires_grad=True)
    for name, f in [
        ("(emb(ids) * w[..., None]).sum(1)", lambda: (emb(ids) * w[..., None]).sum(1)),
        (
            "emb(ids) * w[..., None].expand",
            lambda: (emb(ids) * w[..., None].expand(3, 2, 3)).sum(1),
        ),
        ("control: weight[ids] * w[..., None]", lambda: (emb.weight[ids] * w[..., None]).sum(1)),
    ]:
        e = gxi_error(f, w)
        report(f"4 LRP-0 vs grad x input, {name}", f"{e:.1e}", e < 1e-6)

    # 5. a cat / stack with a constant member whose value a rule needs: the member is not saved,
    # so without record() the call must refuse, naming the node and asking for record(); with it
    # the call must explain (the lead's decision: the value is gone without a recording)
    for name, f in [
        (
            "softmax(cat([x, zeros]))",
            lambda: torch.softmax(torch.cat([x, torch.zeros_like(x[:, :1])], 1), 1),
        ),
        (
            "sub(stack([x, c]), c, alpha=.5)",
            lambda: torch.sub(torch.stack([x, x.detach().cos()], 2).flatten(1), 0.3, alpha=0.5),
        ),
        ("control: softmax(F.pad(x, (0, 1)))", lambda: torch.softmax(F.pad(x, (0, 1)), 1)),
    ]:
        for recorded in (False, True):
            r = explains(f, x, recorded)
            refuses = "ValueRecoveryError" in r and "record(" in r and "Backward0" in r
            fine = r == "ok" or (not recorded and not name.startswith("control") and refuses)
            report(f"5 {name}{', record()' if recorded else ''}", r[:90], fine)

    # 6. addmm / baddbmm vs their expansion c + a @ b
    U = nn.Parameter(torch.randn(4, 2, generator=g, dtype=DT))
    b = nn.Parameter(torch.randn(2, generator=g, dtype=DT))
    for name, f, h in [
        ("addmm(x @ U, x, W)", lambda: torch.addmm(x @ U, x, W), lambda: x @ U + x @ W),
        (
            "addmm(b, x, W, beta=.5, alpha=2)",
            lambda: torch.addmm(b, x, W, beta=0.5, alpha=2.0),
            lambda: 0.5 * b + 2.0 * (x @ W),
        ),
        (
            "baddbmm(x3, x3, x3t)",
            lambda: torch.baddbmm(
                x.view(3, 2, 2), x.view(3, 2, 2), x.view(3, 2, 2).transpose(1, 2)
            ).flatten(1),
            lambda: (
                x.view(3, 2, 2) + torch.bmm(x.view(3, 2, 2), x.view(3, 2, 2).transpose(1, 2))
            ).flatten(1),
        ),
    ]:
        for preset in ("epsilon", "zplus", "dynamiclrp"):
            e = spelling_error(f, h, x, preset)
            report(f"6 {name} vs expansion, {preset}", f"{e:.1e}", e < 1e-9)

    # 7. baddbmm with constants in both mat slots
    a3, b3 = (
        torch.randn(3, 2, 2, generator=g, dtype=DT),
        torch.randn(3, 2, 2, generator=g, dtype=DT),
    )
    for recorded in (False, True):
        r = explains(lambda: torch.baddbmm(x.view(3, 2, 2), a3, b3).flatten(1), x, recorded)
        report(f"7 baddbmm(x3, const, const){', record()' if recorded else ''}", r, r == "ok")
        r = explains(lambda: torch.addmm(x, a3[:, 0], b3[0, :, :1].expand(2, 4)), x, recorded)
        report(f"7 addmm(x, const, const){', record()' if recorded else ''}", r, r == "ok")

    # 8. nn.Linear with a frozen bias: the bias's share is booked as stabiliser, not absorbed
    lin = nn.Linear(4, 3).double()
    lin.bias.requires_grad_(False)
    _, rep = dynamiclrp.explain(lin(x), x, target=0, rules=LRP0, return_report=True)
    share = float(lin.bias[0]) * x.shape[0]
    report(
        "8 frozen bias: absorbed vs the bias's share",
        f"absorbed {rep.absorbed:+.4f}, stabiliser {rep.stabiliser:+.4f}, share {share:+.4f}",
        abs(rep.absorbed - share) < 1e-9,
    )

    # 9. torch.lerp with a constant end and a constant tensor weight (LerpBackward1)
    cw = torch.sigmoid(x.detach())
    P1, P2 = (
        nn.Parameter(torch.randn(4, 5, generator=g, dtype=DT)),
        nn.Parameter(torch.randn(5, 3, generator=g, dtype=DT)),
    )
    for name, f in [
        ("tanh(lerp(x, c, w))", lambda: torch.tanh(torch.lerp(x, x.detach().cos(), cw))),
        (
            "addmm(lerp(x, c, w).t(), P1, P2)",
            lambda: torch.addmm(torch.lerp(x, x.detach().cos(), cw).t(), P1, P2),
        ),
        (
            "control: tanh((1 - w) * x + w * c)",
            lambda: torch.tanh((1 - cw) * x + cw * x.detach().cos()),
        ),
    ]:
        r = explains(f, x, True)
        report(f"9 {name}, record()", r, r == "ok")

    # 10. addcmul above a contraction vs its expansion (bias fusion of the expansion only)
    p = nn.Parameter(torch.randn(2, generator=g, dtype=DT))
    for preset in ("epsilon", "gamma", "zplus"):
        e = spelling_error(
            lambda: torch.addcmul(x @ W, c, p, value=2.0), lambda: x @ W + 2.0 * (c * p), x, preset
        )
        report(f"10 addcmul(x @ W, c, p) vs expansion, {preset}", f"{e:.1e}", e < 1e-9)

    # 11. baddbmm's books where its product term cancels to rounding
    x2 = torch.tensor([[0.6613521715704522, 0.2669240982925188]], dtype=DT, requires_grad=True)
    hc = x2 - x2.mean(1, keepdim=True)
    r2, x4 = hc.repeat(1, 2).view(1, 2, 2), x2.repeat(1, 2).view(1, 2, 2)
    for name, out in [
        ("baddbmm", torch.baddbmm(x4, r2, x4)),
        ("control: c + bmm", x4 + torch.bmm(r2, x4)),
    ]:
        for preset in ("attnlrp", "cp-lrp"):
            _, rep = dynamiclrp.explain(
                out.flatten(1), x2, target=0, rules=preset, return_report=True
            )
            terms = (rep.seeded, *rep.inputs, rep.absorbed, rep.stabiliser, rep.rule)
            rel = abs(rep.residual) / max(1.0, *(abs(t) for t in terms))
            report(
                f"11 {name} books, {preset}", f"residual {rel:.1e} of the largest term", rel < 1e-8
            )

    # 12. an identity masked_fill_ on a slice after an affine layer norm vs no write at all
    V4, lw, lb, Wh = (
        nn.Parameter(torch.randn(*sh, generator=g, dtype=DT)) for sh in ((4, 4), (4,), (4,), (3, 4))
    )

    def f12(x1: torch.Tensor, write: bool) -> torch.Tensor:
        h = F.layer_norm(x1 @ V4, (4,), lw, lb)
        y = h.clone()
        if write:
            y[:, :3].masked_fill_(h[:, :3].detach() > 10.0, 0.0)  # never true
        return F.linear(y, Wh)

    for preset in ("epsilon", "attnlrp"):
        worst = 0.0
        for s in range(10):
            x1 = torch.randn(1, 4, generator=torch.Generator().manual_seed(s), dtype=DT)
            x1.requires_grad_()
            maps = []
            for write in (True, False):
                with dynamiclrp.record() as rec:
                    out = f12(x1, write)
                maps.append(dynamiclrp.explain(out, x1, target=0, rules=preset, recording=rec))
            worst = max(worst, float((maps[0] - maps[1]).abs().max() / maps[1].abs().max()))
        report(
            f"12 identity masked_fill_ after affine layer norm vs no write, {preset}",
            f"{worst:.1e}",
            worst < 1e-9,
        )


if __name__ == "__main__":
    main()
