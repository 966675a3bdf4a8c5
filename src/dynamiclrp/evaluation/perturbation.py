"""Perturbation curves (MoRF / LeRF), their areas and ABPC, per sample.

Features are ranked by relevance; the most relevant (MoRF) or least relevant (LeRF) ones are
replaced step by step and the model re-scored after each step.  A curve is the score of the
explained class as a function of the *fraction* of rankable features replaced, so every sample's
x-axis runs over ``[0, 1]`` whatever its number of features.  See ``docs/evaluation.md``.

Definitions (per sample, trapezoid areas on the fraction axis ``[0, 1]``)::

    AUC(c)            = sum_k (x_{k+1} - x_k) (c_k + c_{k+1}) / 2
    abpc              = AUC(LeRF) - AUC(MoRF)
    comprehensiveness = AUC(baseline) - AUC(MoRF) = original - AUC(MoRF)
    sufficiency       = AUC(baseline) - AUC(LeRF) = original - AUC(LeRF)

where the baseline curve is the unperturbed score held constant, whose area on ``[0, 1]`` is the
unperturbed score itself (``original``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "PerturbationResult",
    "auc",
    "feature_order",
    "gaussian_blur",
    "image_perturbation",
    "token_perturbation",
]


@dataclass
class PerturbationResult:
    """MoRF and LeRF curves of ``N`` samples on a common fraction grid, and their areas.

    Attributes
    ----------
    fractions:
        ``(K+1,)`` float64: fraction of each sample's rankable features replaced, from 0 to 1.
    morf, lerf:
        ``(N, K+1)`` float64: scores after replacing the most / least relevant features first.
        Column 0 is the unperturbed score, column ``K`` the score with every rankable feature
        replaced (the same for both orders).
    original:
        ``(N,)`` float64: the unperturbed score (``morf[:, 0]``).
    auc_morf, auc_lerf:
        ``(N,)`` float64: trapezoid areas of each sample's curves over ``[0, 1]``, computed on
        the sample's own evaluation points (which are ``fractions`` unless the curves were
        interpolated onto the grid, see :func:`token_perturbation`).
    n_features:
        ``(N,)`` long: number of rankable features of each sample.
    """

    fractions: Tensor
    morf: Tensor
    lerf: Tensor
    original: Tensor
    auc_morf: Tensor
    auc_lerf: Tensor
    n_features: Tensor

    @property
    def abpc(self) -> Tensor:
        """Area between the perturbation curves, ``auc_lerf - auc_morf`` (higher is better)."""
        return self.auc_lerf - self.auc_morf

    @property
    def comprehensiveness(self) -> Tensor:
        """``original - auc_morf``: AUC of the constant unperturbed curve minus AUC(MoRF)."""
        return self.original - self.auc_morf

    @property
    def sufficiency(self) -> Tensor:
        """``original - auc_lerf``: AUC of the constant unperturbed curve minus AUC(LeRF)."""
        return self.original - self.auc_lerf

    def summary(self) -> dict[str, float]:
        """Means over samples and their standard errors ``std(ddof=1) / sqrt(N)``.

        Keys: ``n`` and, for each of ``original``, ``auc_morf``, ``auc_lerf``, ``abpc``,
        ``comprehensiveness``, ``sufficiency``, the mean under its name and the standard error
        under ``<name>_se`` (NaN when ``N == 1``: one sample has no spread to estimate).
        """
        out: dict[str, float] = {"n": int(self.original.numel())}
        for name in (
            "original",
            "auc_morf",
            "auc_lerf",
            "abpc",
            "comprehensiveness",
            "sufficiency",
        ):
            v = getattr(self, name).double()
            n = v.numel()
            out[name] = float(v.mean())
            out[f"{name}_se"] = float(v.std(correction=1) / math.sqrt(n)) if n > 1 else math.nan
        return out


def auc(curve: Tensor, fractions: Tensor) -> Tensor:
    """Trapezoid area of ``curve`` (``(..., K+1)``) over ``fractions`` (``(K+1,)``).

    ``AUC = sum_k (x_{k+1} - x_k) (c_k + c_{k+1}) / 2`` along the last dimension.
    """
    fractions = torch.as_tensor(fractions)
    if fractions.dim() != 1 or curve.shape[-1] != fractions.shape[0]:
        raise ValueError(
            f"auc: curve has {curve.shape[-1]} points along its last dimension but fractions has "
            f"shape {tuple(fractions.shape)}; pass one fraction per curve point"
        )
    if fractions.numel() > 1 and bool((fractions.diff() < 0).any()):
        raise ValueError("auc: fractions must be non-decreasing (an x-axis from 0 to 1)")
    return torch.trapezoid(curve, fractions.to(curve), dim=-1)


def feature_order(
    relevance: Tensor, rankable: Tensor | None = None, *, descending: bool = True
) -> Tensor:
    """Features of each row, most relevant first (``descending=True``, MoRF) or least relevant
    first (``descending=False``, LeRF).

    ``relevance`` is ``(N, F)``.  Ties are broken by feature index, lower index first, in both
    orders (a stable sort), so LeRF is not the exact reverse of MoRF where values tie.  Features
    with ``rankable == False`` come after every rankable one (they are never perturbed).
    Returns ``(N, F)`` long feature indices.
    """
    order = torch.sort(relevance, dim=1, descending=descending, stable=True).indices
    if rankable is not None:
        unrankable = (~rankable.gather(1, order)).to(torch.uint8)
        order = order.gather(1, torch.sort(unrankable, dim=1, stable=True).indices)
    return order


def gaussian_blur(images: Tensor, kernel_size: int = 51, sigma: float = 20.0) -> Tensor:
    """Gaussian blur of ``(N, C, H, W)`` images, separable, with reflect padding.

    The 1-D kernel is ``g(t) = exp(-t^2 / (2 sigma^2))`` at ``t = -(k-1)/2 .. (k-1)/2``,
    normalised to sum 1 (torchvision's ``gaussian_blur``).  Along an axis of size ``d`` the
    kernel size is clipped to ``min(kernel_size, 2 d - 1)`` so that reflect padding
    (``k // 2 <= d - 1``) is defined; for ``kernel_size <= 2 d - 1`` the result is
    torchvision's.  The two 1-D convolutions (padding included) are applied as ``d x d``
    matrices, ``B_H X B_W^T`` per channel, which is much faster on CPU than a 51-tap ``conv2d``.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"gaussian_blur: kernel_size must be a positive odd int, got {kernel_size}"
        )
    if not sigma > 0:
        raise ValueError(f"gaussian_blur: sigma must be positive, got {sigma}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"gaussian_blur: expected float images (N, C, H, W), got {tuple(images.shape)} "
            f"{images.dtype}"
        )
    h, w = images.shape[2:]
    b_h = _blur_matrix(h, min(kernel_size, 2 * h - 1), sigma).to(images)
    b_w = _blur_matrix(w, min(kernel_size, 2 * w - 1), sigma).to(images)
    return b_h @ images @ b_w.T


def _blur_matrix(d: int, k: int, sigma: float) -> Tensor:
    """``(d, d)`` float64 matrix of a 1-D convolution with the Gaussian ``k``-tap kernel over
    a reflect-padded axis: ``out_o = sum_j g_j x_{reflect(o + j - k // 2)}``."""
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    src = torch.arange(d)[:, None] + torch.arange(k)[None] - k // 2  # (d, k) padded positions
    src = torch.where(src < 0, -src, src)
    src = torch.where(src > d - 1, 2 * (d - 1) - src, src)
    out = torch.zeros(d, d, dtype=torch.float64)
    out.scatter_add_(1, src, g.expand(d, k).contiguous())
    return out


def image_perturbation(
    score_fn: ScoreFn,
    images: Tensor,
    relevance: Tensor,
    *,
    patch: int = 1,
    steps: int | None = None,
    per_step: int | None = None,
    replacement: str | Tensor = "blur",
    blur_kernel: int = 51,
    blur_sigma: float = 20.0,
    patch_pool: str = "max",
    batch_size: int = 64,
    progress: bool = False,
) -> PerturbationResult:
    """MoRF / LeRF perturbation curves of images.

    Parameters
    ----------
    score_fn:
        ``(perturbed (b, C, H, W), idx (b,) long) -> (b,)`` scores of the explained class, e.g.
        the per-sample target probability; ``idx`` are the rows of ``images`` in the batch.
        Called under ``torch.no_grad()``.
    images:
        ``(N, C, H, W)`` float.
    relevance:
        ``(N, H, W)`` pixel relevance (e.g. summed over channels).
    patch:
        Side of the square cells that are the features: the ``H x W`` grid is cut into
        ``patch x patch`` cells (``H`` and ``W`` must be multiples of ``patch``), each cell's
        relevance is the ``max`` (the paper) or ``sum`` (``patch_pool``) of its pixels, and
        whole cells are replaced.  ``patch=1``: pixels.
    steps, per_step:
        Exactly one.  ``steps=K``: evaluate at the fractions ``k/K`` (``k = 0..K``) of the
        ``F`` features, replacing ``round(k F / K)`` features (halves round up).
        ``per_step=s``: replace ``s`` more features at each step (the last step may be
        shorter), at the fractions ``min(k s, F) / F``.  Paper: VGG16 ``patch=1,
        per_step=1024``; ViT-B/16 ``patch=16, per_step=4``.
    replacement:
        What replaces a feature: ``"blur"`` (a :func:`gaussian_blur` copy of the image with
        ``blur_kernel``, ``blur_sigma``; paper: 51, 20.0), ``"mean"`` (the image's per-channel
        mean), ``"zero"``, or a tensor of ``images``' shape.
    batch_size:
        Number of perturbed images per ``score_fn`` call (steps of several samples together).
    progress:
        Show a tqdm progress bar (needs ``tqdm``).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"image_perturbation: images must be float (N, C, H, W), got {tuple(images.shape)} "
            f"{images.dtype}"
        )
    n, c, h, w = images.shape
    if relevance.shape != (n, h, w):
        raise ValueError(
            f"image_perturbation: relevance has shape {tuple(relevance.shape)}, expected "
            f"(N, H, W) = {(n, h, w)}; pool channels first (evaluation.task.feature_relevance)"
        )
    if not isinstance(patch, int) or patch < 1 or h % patch or w % patch:
        raise ValueError(
            f"image_perturbation: patch={patch!r} must be a positive int dividing H={h} and W={w}; "
            "crop or resize the images to a multiple of the patch size"
        )
    if patch_pool not in ("max", "sum"):
        raise ValueError(
            f"image_perturbation: patch_pool must be 'max' or 'sum', got {patch_pool!r}"
        )
    if steps is None and per_step is None:
        raise ValueError(
            "image_perturbation: pass steps= (fraction grid k/steps) or per_step= (features "
            "replaced per step); there is no default step count"
        )
    gh, gw = h // patch, w // patch
    cells = relevance.reshape(n, gh, patch, gw, patch)
    cells = cells.amax(dim=(2, 4)) if patch_pool == "max" else cells.sum(dim=(2, 4))
    replace = _image_replacement(images, replacement, blur_kernel, blur_sigma)

    def perturb(rows: Tensor, mask: Tensor) -> Tensor:
        m = mask.reshape(-1, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        m = m.to(images.device)
        return torch.where(m, replace(rows), images[rows.to(images.device)])

    return _curves(
        score_fn,
        cells.reshape(n, gh * gw),
        None,
        perturb,
        steps=steps,
        per_step=per_step,
        grid=None,
        batch_size=batch_size,
        progress=progress,
        who="image_perturbation",
    )


def token_perturbation(
    score_fn: ScoreFn,
    input_ids: Tensor,
    relevance: Tensor,
    *,
    replacement_id: int,
    rankable: Tensor | None = None,
    steps: int | None = None,
    per_step: int | None = None,
    grid: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> PerturbationResult:
    """MoRF / LeRF perturbation curves of token sequences.

    Parameters
    ----------
    score_fn:
        ``(perturbed_ids (b, T), idx (b,) long) -> (b,)`` scores of the explained class; ``idx``
        are the rows of ``input_ids`` in the batch.  Called under ``torch.no_grad()``.
    input_ids:
        ``(N, T)`` long.
    relevance:
        ``(N, T)`` token relevance.
    replacement_id:
        The id written into a replaced token.
    rankable:
        ``(N, T)`` bool, ``False`` for padding and special tokens: they are never ranked nor
        replaced and do not count on the x-axis.  ``None``: every token.
    steps, per_step:
        At most one (neither: ``per_step=1``, one token per step as in the paper).
        ``steps=K``: every sample is evaluated on the common grid ``k/K``, replacing
        ``round(k n_i / K)`` (halves round up) of its ``n_i`` rankable tokens.
        ``per_step=s``: sample ``i`` replaces ``s`` more tokens per step and is evaluated at its
        own fractions ``min(k s, n_i) / n_i``; its areas are computed on those points.  If all
        samples have the same ``n_i`` these points are the common grid; otherwise each curve is
        linearly interpolated onto ``grid + 1`` equally spaced fractions (``grid`` defaults to
        the largest number of steps of any sample) for ``morf``/``lerf``/``fractions`` only.
    grid:
        See ``per_step``; only allowed with ``per_step``.
    batch_size, progress:
        As in :func:`image_perturbation`.
    """
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"token_perturbation: input_ids must be integer (N, T), got {tuple(input_ids.shape)} "
            f"{input_ids.dtype}"
        )
    if relevance.shape != input_ids.shape:
        raise ValueError(
            f"token_perturbation: relevance has shape {tuple(relevance.shape)}, expected "
            f"input_ids' {tuple(input_ids.shape)}; pool the embedding dimension first"
        )
    if rankable is not None and (rankable.shape != input_ids.shape or rankable.dtype != torch.bool):
        raise ValueError(
            f"token_perturbation: rankable must be a bool tensor of shape {tuple(input_ids.shape)}"
            f", got {tuple(rankable.shape)} {rankable.dtype}"
        )
    if steps is None and per_step is None:
        per_step = 1
    if grid is not None and per_step is None:
        raise ValueError("token_perturbation: grid= only applies with per_step= (not steps=)")

    def perturb(rows: Tensor, mask: Tensor) -> Tensor:
        ids = input_ids[rows.to(input_ids.device)]
        return ids.masked_fill(mask.to(ids.device), int(replacement_id))

    return _curves(
        score_fn,
        relevance,
        None if rankable is None else rankable.to(relevance.device),
        perturb,
        steps=steps,
        per_step=per_step,
        grid=grid,
        batch_size=batch_size,
        progress=progress,
        who="token_perturbation",
    )


def _image_replacement(
    images: Tensor, replacement: str | Tensor, kernel: int, sigma: float
) -> Callable[[Tensor], Tensor]:
    """``rows -> (b, C, H, W)`` replacement values for those rows of ``images``."""
    if isinstance(replacement, Tensor):
        if replacement.shape != images.shape:
            raise ValueError(
                f"image_perturbation: replacement tensor has shape {tuple(replacement.shape)}, "
                f"expected the images' {tuple(images.shape)}"
            )
        return lambda rows: replacement[rows.to(replacement.device)].to(images)
    if replacement == "blur":
        gaussian_blur(images[:1], kernel, sigma)  # validate the arguments before any work
        cache: dict[int, Tensor] = {}  # blurred images of the previous batch's samples

        def blurred(rows: Tensor) -> Tensor:
            uniq = rows.unique().tolist()
            todo = [i for i in uniq if i not in cache]
            if todo:
                new = gaussian_blur(images[torch.tensor(todo, device=images.device)], kernel, sigma)
                cache.update(zip(todo, new, strict=True))
            for i in [i for i in cache if i not in uniq]:
                del cache[i]
            return torch.stack([cache[i] for i in rows.tolist()])

        return blurred
    if replacement == "mean":
        return lambda rows: (
            images[rows.to(images.device)]
            .mean((2, 3), keepdim=True)
            .expand(-1, -1, images.shape[2], images.shape[3])
        )
    if replacement == "zero":
        return lambda rows: torch.zeros_like(images[rows.to(images.device)])
    raise ValueError(
        f"image_perturbation: replacement={replacement!r}; expected 'blur', 'mean', 'zero' or a "
        "tensor of the images' shape"
    )


def _positive_int(value: object, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
    return value


def _schedule(
    n_feat: Tensor, steps: int | None, per_step: int | None, who: str
) -> tuple[list[Tensor], list[Tensor]]:
    """Per sample: the number of features replaced at each step, and the x-value of each step."""
    if steps is not None and per_step is not None:
        raise ValueError(f"{who}: pass steps= or per_step=, not both")
    counts, xs = [], []
    if steps is not None:
        k_steps = _positive_int(steps, "steps", who)
        k = torch.arange(k_steps + 1)
        x = k.double() / k_steps
        for n_i in n_feat.tolist():
            counts.append((2 * k * n_i + k_steps) // (2 * k_steps))  # round half up, exactly
            xs.append(x)
    else:
        s = _positive_int(per_step, "per_step", who)
        for n_i in n_feat.tolist():
            c = torch.clamp(torch.arange(-(-n_i // s) + 1) * s, max=n_i)
            counts.append(c)
            xs.append(c.double() / n_i)
    return counts, xs


def _curves(
    score_fn: ScoreFn,
    relevance: Tensor,
    rankable: Tensor | None,
    perturb: Callable[[Tensor, Tensor], Tensor],
    *,
    steps: int | None,
    per_step: int | None,
    grid: int | None,
    batch_size: int,
    progress: bool,
    who: str,
) -> PerturbationResult:
    batch_size = _positive_int(batch_size, "batch_size", who)
    n, n_all = relevance.shape
    valid = torch.ones_like(relevance, dtype=torch.bool) if rankable is None else rankable
    bad = valid & ~torch.isfinite(relevance)
    if bool(bad.any()):
        rows = bad.any(1).nonzero().flatten().tolist()[:10]
        raise ValueError(f"{who}: relevance is NaN or infinite at rankable features of rows {rows}")
    n_feat = valid.sum(1).cpu()
    if bool((n_feat == 0).any()):
        rows = (n_feat == 0).nonzero().flatten().tolist()[:10]
        raise ValueError(f"{who}: rows {rows} have no rankable features; drop them before calling")
    counts, xs = _schedule(n_feat, steps, per_step, who)

    # Unique (row, order, count) evaluations; count 0 and count n_i are shared by both orders.
    width = n_all + 1
    keys_per_row = []
    for i, c in enumerate(counts):
        inner = c[(c > 0) & (c < n_feat[i])]
        shared = torch.stack([c.new_tensor(0), n_feat[i]])
        keys_per_row.append(i * 2 * width + shared)
        keys_per_row.append(i * 2 * width + torch.cat([inner, width + inner]))
    keys = torch.unique(torch.cat(keys_per_row))
    job_row, rest = keys // (2 * width), keys % (2 * width)
    job_lerf, job_count = rest >= width, rest % width
    scores = torch.empty(keys.numel(), dtype=torch.float64)

    bar = _progress_bar(keys.numel(), who) if progress else None
    device = relevance.device
    with torch.no_grad():
        for start in range(0, keys.numel(), batch_size):
            sl = slice(start, start + batch_size)
            rows, lerf, count = job_row[sl], job_lerf[sl], job_count[sl]
            uniq, inv = torch.unique(rows, return_inverse=True)
            rel_u, ok_u = relevance[uniq.to(device)], valid[uniq.to(device)]
            rank = torch.empty((2, uniq.numel(), n_all), dtype=torch.long, device=device)
            pos = torch.arange(n_all, device=device).expand(uniq.numel(), -1)
            for o, desc in ((0, True), (1, False)):
                rank[o].scatter_(1, feature_order(rel_u, ok_u, descending=desc), pos)
            mask = rank[lerf.long().to(device), inv.to(device)] < count.to(device)[:, None]
            out = score_fn(perturb(rows, mask), rows)
            if not isinstance(out, Tensor) or out.shape != (rows.numel(),):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"{who}: score_fn must return a ({rows.numel()},) tensor for a batch of "
                    f"{rows.numel()}, got {shape}; return one score per perturbed input"
                )
            out = out.detach().to("cpu", torch.float64)
            if not bool(torch.isfinite(out).all()):
                raise ValueError(f"{who}: score_fn returned NaN/inf for rows {rows.tolist()[:10]}")
            scores[sl] = out
            if bar is not None:
                bar.update(rows.numel())
    if bar is not None:
        bar.close()

    def lookup(i: int, c: Tensor, lerf: bool) -> Tensor:
        shared = (c == 0) | (c == n_feat[i])
        key = i * 2 * width + torch.where(shared | (not lerf), c, c + width)
        return scores[torch.searchsorted(keys, key)]

    morf_rows = [lookup(i, c, False) for i, c in enumerate(counts)]
    lerf_rows = [lookup(i, c, True) for i, c in enumerate(counts)]
    auc_morf = torch.stack([auc(y, x) for y, x in zip(morf_rows, xs, strict=True)])
    auc_lerf = torch.stack([auc(y, x) for y, x in zip(lerf_rows, xs, strict=True)])
    same_x = all(x.shape == xs[0].shape and torch.equal(x, xs[0]) for x in xs)
    if same_x:
        fractions, morf, lerf = xs[0], torch.stack(morf_rows), torch.stack(lerf_rows)
    else:
        g = _positive_int(grid, "grid", who) if grid is not None else max(x.numel() - 1 for x in xs)
        fractions = torch.linspace(0, 1, g + 1, dtype=torch.float64)

        def interp(ys: list[Tensor]) -> Tensor:
            return torch.from_numpy(
                np.stack(
                    [
                        np.interp(fractions.numpy(), x.numpy(), y.numpy())
                        for x, y in zip(xs, ys, strict=True)
                    ]
                )
            )

        morf, lerf = interp(morf_rows), interp(lerf_rows)
    return PerturbationResult(
        fractions=fractions,
        morf=morf,
        lerf=lerf,
        original=morf[:, 0].clone(),
        auc_morf=auc_morf,
        auc_lerf=auc_lerf,
        n_features=n_feat.long(),
    )


def _progress_bar(total: int, who: str):
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{who}: progress=True needs tqdm (pip install tqdm), or pass progress=False"
        ) from e
    return tqdm(total=total, desc=who, unit="input")
