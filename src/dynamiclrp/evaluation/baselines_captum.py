"""Captum 0.9 baselines of :mod:`.methods` (``pip install captum``), imported lazily.

``saliency`` :math:`|\\partial f_t/\\partial x|`, ``inputxgradient``
:math:`x \\odot \\partial f_t/\\partial x`, ``integrated_gradients``
:math:`x \\odot \\int_0^1 \\partial f_t(\\alpha x)/\\partial x\\, d\\alpha` (zero baseline,
``n_steps`` Gauss-Legendre nodes), ``gradientshap``, ``smoothgrad``, ``occlusion``: see
:class:`CaptumMethod`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor

from ._method_base import Method, _expanding_forward, _seeded, data_stats
from .task import Problem


def _captum():
    try:
        return importlib.import_module("captum.attr")
    except ImportError as err:
        raise ImportError(
            "The Captum baselines need the 'captum' package (pip install captum==0.9.0)"
        ) from err


class CaptumMethod(Method):
    """A Captum attribution with ``forward_func = problem.forward`` and per-sample targets.

    Options (stated in :attr:`params`, all defaults are what runs):

    - ``saliency``: ``abs`` (default True, Captum's).
    - ``integrated_gradients``: zero baseline, ``n_steps`` (32), ``method`` ("gausslegendre",
      Captum's), ``internal_batch_size`` (None: all steps in one batch).
    - ``gradientshap``: baselines = a distribution of ``n_baselines`` (8) tensors, the zero
      input and ``n_baselines - 1`` draws of ``N(0, (baseline_scale * std)^2)`` with ``std``
      the task's data standard deviation (:func:`data_stats`) and ``baseline_scale`` (1.0);
      ``n_samples`` (16) draws of (baseline, alpha) per sample; ``stdevs`` (0.0, Captum's)
      extra input noise in data-std units.
    - ``smoothgrad``: NoiseTunnel(Saliency(abs=True)), ``nt_samples`` (16), noise
      ``N(0, (noise * std)^2)`` with ``noise`` (0.15) times the task's data std (Smilkov et
      al. take 10-20 % of the input range instead), ``nt_samples_batch_size`` (None).
    - ``occlusion``: zero baseline; images: window ``(C, p, p)``, stride ``p`` with ``p =
      patch`` if given, else ``task.patch`` when it is > 1, else 4; tokens: window ``(1, D)``
      (one token), stride 1; ``perturbations_per_eval`` (1).

    The stochastic ones draw their noise under ``torch.manual_seed(seed)`` (default 0) and
    restore the global generator afterwards.
    """

    DEFAULTS: dict[str, dict[str, Any]] = {
        "saliency": {"abs": True},
        "inputxgradient": {},
        "integrated_gradients": {
            "n_steps": 32,
            "method": "gausslegendre",
            "internal_batch_size": None,
        },
        "gradientshap": {
            "n_samples": 16,
            "n_baselines": 8,
            "baseline_scale": 1.0,
            "stdevs": 0.0,
            "seed": 0,
        },
        "smoothgrad": {"nt_samples": 16, "noise": 0.15, "nt_samples_batch_size": None, "seed": 0},
        "occlusion": {"patch": None, "perturbations_per_eval": 1},
    }
    FAMILY = {"occlusion": "perturbation"}

    def __init__(self, kind: str, name: str | None = None, **options):
        unknown = set(options) - set(self.DEFAULTS[kind])
        if unknown:
            raise TypeError(
                f"{kind}: unknown options {sorted(unknown)}; it takes {sorted(self.DEFAULTS[kind])}"
            )
        params = {**self.DEFAULTS[kind], **options}
        super().__init__(name or kind, self.FAMILY.get(kind, "gradient"), params)
        self.kind = kind
        self.attr = _captum()
        self._stats: dict = {}

    def _attribute(self, problem: Problem) -> Tensor:
        ca, p = self.attr, self.params
        x = problem.x.detach().clone()
        batch = x.shape[0]
        fwd = _expanding_forward(problem)
        common = dict(
            target=problem.target.to(x.device), additional_forward_args=(torch.arange(batch),)
        )
        if self.kind == "saliency":
            return ca.Saliency(fwd).attribute(x.requires_grad_(), abs=p["abs"], **common)
        if self.kind == "inputxgradient":
            return ca.InputXGradient(fwd).attribute(x.requires_grad_(), **common)
        if self.kind == "integrated_gradients":
            ig = ca.IntegratedGradients(fwd)
            return ig.attribute(
                x,
                baselines=torch.zeros_like(x),
                n_steps=p["n_steps"],
                method=p["method"],
                internal_batch_size=p["internal_batch_size"],
                **common,
            )
        if self.kind == "occlusion":
            return self._occlusion(problem, x, fwd, common)
        std = data_stats(problem, self._stats)[2]
        with _seeded(p["seed"], x.device):
            if self.kind == "smoothgrad":
                nt = ca.NoiseTunnel(ca.Saliency(fwd))
                return nt.attribute(
                    x,
                    nt_type="smoothgrad",
                    nt_samples=p["nt_samples"],
                    nt_samples_batch_size=p["nt_samples_batch_size"],
                    stdevs=p["noise"] * std,
                    abs=True,
                    **common,
                )
            noise = torch.randn((p["n_baselines"] - 1, *x.shape[1:]), dtype=x.dtype)
            zero = torch.zeros((1, *x.shape[1:]), dtype=x.dtype)
            base = torch.cat([zero, p["baseline_scale"] * std * noise])
            return ca.GradientShap(fwd).attribute(
                x,
                baselines=base.to(x.device),
                n_samples=p["n_samples"],
                stdevs=p["stdevs"] * std,
                **common,
            )

    def _occlusion(self, problem: Problem, x: Tensor, fwd, common: dict) -> Tensor:
        p = self.params
        if x.dim() == 4:
            size = p["patch"]
            if size is None:
                size = problem.task.patch if problem.task is not None else 1
                size = size if size > 1 else 4
            window, strides = (x.shape[1], size, size), (x.shape[1], size, size)
        elif x.dim() == 3:
            window, strides = (1, x.shape[2]), (1, x.shape[2])
        else:
            raise ValueError(
                f"occlusion: x must be images (B, C, H, W) or tokens (B, T, D), got "
                f"{tuple(x.shape)}"
            )
        self.params["window"] = window
        return self.attr.Occlusion(fwd).attribute(
            x,
            sliding_window_shapes=window,
            strides=strides,
            baselines=0.0,
            perturbations_per_eval=p["perturbations_per_eval"],
            **common,
        )
