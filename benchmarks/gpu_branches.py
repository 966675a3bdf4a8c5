"""The rule branches that run only off the CPU, checked on CUDA against the CPU.

Some rules look for a rare case (a sum that cancels to rounding level, an infinite summand, a
``-inf`` mask) with a data-dependent ``if`` on the CPU, but always take the masked path on a GPU,
where that ``if`` would synchronise.  The test suite runs on the CPU only, so those GPU paths are
checked here: small float64 programs that reach them (a stable softmax numerator
``exp(x - amax(x))``, a sum of centred values, an additive ``-inf`` mask, in-place add and
multiply on slices, SDPA's math path with a causal mask), explained under several presets on the
CPU and on CUDA from the same numbers.  Each line prints the largest difference and the CUDA
run's book residual; exit status 1 if a difference exceeds 1e-9 or a residual 1e-8 of the seed.

    PYTHONPATH=src python benchmarks/gpu_branches.py                # needs CUDA
    PYTHONPATH=src python benchmarks/gpu_branches.py --device cpu   # dry run: CPU against CPU
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dynamiclrp

D = torch.float64
PRESETS = ("attnlrp", "captum", "epsilon", "dynamiclrp", "gamma")


def stable_softmax(x, w):
    return F.linear(torch.exp(x - x.amax(1, keepdim=True)), w)


def centred_sum(x, w):
    total = (x - x.mean(1, keepdim=True)).sum(1, keepdim=True)
    return F.linear(torch.cat([x[:, :3], torch.exp(total)], 1), w)


def additive_inf_mask(x, w):
    s = x[:, :, None] * x[:, None, :]
    keep = torch.ones(4, 4, dtype=torch.bool, device=x.device).tril()
    mask = torch.zeros(4, 4, dtype=D, device=x.device).masked_fill(~keep, float("-inf"))
    return F.linear((s + mask).softmax(-1).sum(1), w)


def inplace_add_mul(x, w):
    h = x * 1.0
    h[:, :2].add_(0.5)
    h[:, 2:].mul_(2.0)
    return F.linear(h, w)


def sdpa_math_causal(x, w):
    q = x.reshape(1, 1, 3, 4).expand(1, 2, 3, 4) * 1.0
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(q, q * 0.5, q + 1.0, is_causal=True)
    return F.linear(o.sum(1)[0], w)


CASES = {
    "stable softmax": (stable_softmax, PRESETS),
    "centred sum": (centred_sum, PRESETS),
    "additive -inf mask": (additive_inf_mask, PRESETS),
    "in-place add/mul": (inplace_add_mul, PRESETS),
    "SDPA math, causal": (sdpa_math_causal, ("attnlrp", "dynamiclrp")),
}


def explain_on(device: str, program, preset: str):
    g = torch.Generator().manual_seed(1)  # the same numbers on every device
    x = torch.randn(3, 4, generator=g, dtype=D).to(device).requires_grad_(True)
    w = torch.randn(3, 4, generator=g, dtype=D).to(device)
    with dynamiclrp.record() as rec:
        out = program(x, w)
    rel, rep = dynamiclrp.explain(out, x, target=0, rules=preset, recording=rec, return_report=True)
    return rel.detach().cpu(), rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU")
    args = ap.parse_args(argv)
    failed = 0
    for name, (program, presets) in CASES.items():
        for preset in presets:
            ref, _ = explain_on("cpu", program, preset)
            rel, rep = explain_on(args.device, program, preset)
            diff = float((rel - ref).abs().max())
            ok = diff <= 1e-9 and abs(rep.residual) <= 1e-8 * max(1.0, abs(rep.seeded))
            failed += not ok
            print(
                f"{name:20s} {preset:11s} max |cpu - {args.device}| {diff:.1e}  "
                f"residual {rep.residual:+.1e}  {'ok' if ok else 'FAIL'}"
            )
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
