"""Attribution methods for the evaluation harness: DynamicLRP and its baselines, one interface.

A method is a callable ``method(problem) -> Tensor`` returning a relevance of ``problem.x``'s
shape for the column ``problem.target`` of ``problem.forward(x)`` (see :mod:`.task`).
:func:`make_method` builds one from a name of :func:`available_methods`:

- ``"dynamiclrp:<preset>"`` for every preset of :data:`dynamiclrp.PRESETS` (or a
  :class:`~dynamiclrp.Rules` object): the forward pass runs under :func:`dynamiclrp.record`, one
  reusable :class:`dynamiclrp.LRP` per method explains it (its plan cache serves later batches).
- Captum 0.9 (``pip install captum``): ``saliency`` :math:`|\\partial f_t/\\partial x|`,
  ``inputxgradient`` :math:`x \\odot \\partial f_t/\\partial x`, ``integrated_gradients``
  :math:`x \\odot \\int_0^1 \\partial f_t(\\alpha x)/\\partial x\\, d\\alpha` (zero baseline,
  ``n_steps`` Gauss-Legendre nodes), ``gradientshap``, ``smoothgrad``, ``occlusion``.
- Zennit 0.5.1 (``pip install zennit``): ``zennit:<composite>``, the modified gradient at the
  input for the seed ``onehot(target) * f(x)``.
- ``random``: i.i.d. uniform ``[0, 1)`` values, a function of ``(seed, sample index)`` only.
- LxT 2.1 (``lxt:attnlrp``, ``lxt:cp-lrp``): ``x * grad`` of the LxT-patched Hugging Face
  model, computed in another interpreter by ``lxt_worker.py`` (:class:`LxTMethod`).

Noise scales and Zennit's box bounds are set from the task's data (:func:`data_stats`), never
from the batch, so that an attribution does not depend on how samples are batched.  A method
leaves nothing behind: hooks are removed, parameter flags and values are unchanged,
``problem.x`` is not modified, global random state is restored.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import dynamiclrp

from .task import Problem, Task

FAMILIES = ("lrp", "gradient", "perturbation", "random")
STATS_SAMPLES = 256  # data_stats uses the first STATS_SAMPLES samples of a task


class Method:
    """An attribution method: ``method(problem) -> Tensor`` of ``problem.x``'s shape.

    Attributes
    ----------
    name:
        The row label for result tables (the spec it was made from unless ``name=`` was given).
    family:
        One of :data:`FAMILIES`.
    params:
        The hyperparameters that actually run (for reports).
    """

    def __init__(self, name: str, family: str, params: dict[str, Any] | None = None):
        if family not in FAMILIES:
            raise ValueError(f"Method {name!r}: family {family!r} is not one of {FAMILIES}")
        self.name = name
        self.family = family
        self.params = dict(params or {})

    def __call__(self, problem: Problem) -> Tensor:
        if not isinstance(problem.x, Tensor) or not problem.x.is_floating_point():
            raise TypeError(f"{self.name}: problem.x must be a float tensor, got {problem.x!r:.80}")
        rel = self._attribute(problem)
        if rel.shape != problem.x.shape:
            raise RuntimeError(
                f"{self.name} returned shape {tuple(rel.shape)} for x of shape "
                f"{tuple(problem.x.shape)}"
            )
        return rel.detach().to(dtype=problem.x.dtype)

    def _attribute(self, problem: Problem) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, {self.params})"


# -- helpers ----------------------------------------------------------------------------------


def _leaf(problem: Problem) -> Tensor:
    """A fresh leaf copy of ``problem.x`` that requires grad (``problem.x`` stays untouched)."""
    return problem.x.detach().clone().requires_grad_(True)


def _onehot_seed(out: Tensor, target: Tensor) -> Tensor:
    """``seed[b, c] = out[b, c]`` if ``c == target[b]`` else 0 (the explained logit)."""
    if out.dim() != 2 or out.shape[0] != target.shape[0]:
        raise ValueError(
            f"forward(x) must be (batch, classes) with batch = len(target) = {target.shape[0]}, "
            f"got shape {tuple(out.shape)}"
        )
    seed = torch.zeros_like(out)
    rows = torch.arange(out.shape[0], device=out.device)
    tgt = target.to(out.device)
    seed[rows, tgt] = out.detach()[rows, tgt]
    return seed


def _need_model(problem: Problem, who: str) -> nn.Module:
    if problem.model is None:
        raise ValueError(f"{who} needs problem.model (the nn.Module that owns the parameters)")
    return problem.model


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's and numpy's global generators for the block and restore their state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    state = np.random.get_state()  # Captum's GradientShap draws from numpy's generator
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
    finally:
        np.random.set_state(state)


def data_stats(problem: Problem, cache: dict | None = None) -> tuple[float, float, float]:
    """``(min, max, std)`` of the attributed tensor over the task's data.

    Computed from ``task.to_x(task.inputs[:STATS_SAMPLES])`` (chunks of 16 samples), so the
    value is the same for every batch of a task; a :class:`Problem` without ``task`` uses its
    own ``x``.  ``std`` is the population standard deviation of all entries.
    """
    task = problem.task
    if task is None:
        x = problem.x.detach().double()
        return x.min().item(), x.max().item(), x.std(unbiased=False).item()
    key = id(task)
    if cache is not None and key in cache and cache[key][0] is task:
        return cache[key][1]
    lo, hi, s1, s2, n = float("inf"), float("-inf"), 0.0, 0.0, 0
    inputs = task.inputs[:STATS_SAMPLES]
    with torch.no_grad():
        for i in range(0, inputs.shape[0], 16):
            x = task.to_x(inputs[i : i + 16]).double()
            lo, hi = min(lo, x.min().item()), max(hi, x.max().item())
            s1, s2, n = s1 + x.sum().item(), s2 + (x * x).sum().item(), n + x.numel()
    mean = s1 / n
    stats = (lo, hi, max(s2 / n - mean * mean, 0.0) ** 0.5)
    if cache is not None:
        cache[key] = (task, stats)
    return stats


def _expanding_forward(problem: Problem) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(x_rows, rows)``: the scores of a batch whose row ``r`` is a copy of sample
    ``rows[r]`` of the problem (Captum repeats or interleaves the batch and expands
    ``additional_forward_args=(arange(B),)`` alike).  With a task, one call
    ``task.forward(x_rows, idx[rows])``; without, ``problem.forward`` on each block of rows that
    holds every sample once in order."""
    batch = problem.x.shape[0]
    task, idx = problem.task, problem.idx

    def forward(x_rows: Tensor, rows: Tensor) -> Tensor:
        rows = rows.to("cpu")
        if rows.shape[0] == batch and torch.equal(rows, torch.arange(batch)):
            return problem.forward(x_rows)
        if task is not None and idx is not None:
            return task.forward(x_rows, idx[rows])
        counts = torch.bincount(rows, minlength=batch)
        if rows.shape[0] % batch or (counts != rows.shape[0] // batch).any():
            raise RuntimeError(
                f"cannot split an expanded batch of {rows.shape[0]} rows into copies of the "
                f"{batch} samples; give the Problem a task and idx"
            )
        order = torch.argsort(rows * rows.shape[0] + torch.arange(rows.shape[0]))
        copies = order.view(batch, -1).T  # copies[k, b]: the k-th row holding sample b
        out = torch.cat([problem.forward(x_rows[c.to(x_rows.device)]) for c in copies])
        inv = torch.empty_like(order)
        inv[copies.reshape(-1)] = torch.arange(rows.shape[0])
        return out[inv.to(out.device)]

    return forward


# -- DynamicLRP -------------------------------------------------------------------------------


class DynamicLRPMethod(Method):
    """``dynamiclrp.LRP(rules).explain(forward(x), x, target)`` with the forward pass recorded.

    For ``zennit-epsilon-gamma-box`` the box bounds are ``low``/``high`` when given, else the
    task's data range (:func:`data_stats`), as for ``zennit:epsilon_gamma_box``.
    """

    def __init__(self, rules: str | dynamiclrp.Rules, name: str | None = None, **box):
        resolved = dynamiclrp.preset(rules)
        self._box = resolved.name == "zennit-epsilon-gamma-box"
        if box and not (self._box and set(box) <= {"low", "high"}):
            raise TypeError(
                f"dynamiclrp:{resolved.name} takes no options {sorted(box)} (only "
                "zennit-epsilon-gamma-box takes low=, high=)"
            )
        params = {"rules": resolved.name, **box}
        super().__init__(name or f"dynamiclrp:{resolved.name}", "lrp", params)
        self.box = box
        self.lrp = dynamiclrp.LRP(resolved)
        self._lrps: dict[tuple[float, float], dynamiclrp.LRP] = {}
        self._stats: dict = {}

    def _explainer(self, problem: Problem) -> dynamiclrp.LRP:
        if not self._box:
            return self.lrp
        lo, hi, _ = data_stats(problem, self._stats)
        bounds = (self.box.get("low", lo), self.box.get("high", hi))
        if bounds not in self._lrps:
            rules = dynamiclrp.presets.zennit_epsilon_gamma_box(*bounds)
            self._lrps[bounds] = dynamiclrp.LRP(rules)
        return self._lrps[bounds]

    def _attribute(self, problem: Problem) -> Tensor:
        lrp = self._explainer(problem)
        x = _leaf(problem)
        with dynamiclrp.record(problem.model) as rec:
            out = problem.forward(x)
        return lrp.explain(out, x, target=problem.target, recording=rec)


# -- Captum -----------------------------------------------------------------------------------


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


# -- Zennit -----------------------------------------------------------------------------------


def _zennit(module: str = ""):
    try:
        return importlib.import_module("zennit" + module)
    except ImportError as err:
        raise ImportError(
            "The Zennit baselines need the 'zennit' package (pip install zennit==0.5.1)"
        ) from err


class ZennitMethod(Method):
    """Zennit's composite: ``grad`` of ``forward(x)`` at ``x`` for ``grad_outputs =
    onehot(target) * forward(x)`` with the composite registered on ``problem.model``.

    Canonizers (``canonizers=`` overrides): ``ResNetCanonizer`` for torchvision ResNets,
    ``SequentialMergeBatchNorm`` for any other model with a batch norm (as Zennit's docs do for
    VGG-BN), none otherwise.  ``exact_merge`` (True) makes each merged batch norm an exact
    identity, the fix Zennit's repository adopted after 0.5.1 (issue #234, PR #240; 0.5.1
    leaves ``x / sqrt(1 + eps)``, ``docs/presets.md``).  ``epsilon_gamma_box``: ``low`` /
    ``high`` (default: the task's data range, :func:`data_stats`).
    """

    COMPOSITES = {
        "epsilon_plus": "EpsilonPlus",
        "epsilon_plus_flat": "EpsilonPlusFlat",
        "epsilon_gamma_box": "EpsilonGammaBox",
        "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
        "epsilon_alpha2_beta1_flat": "EpsilonAlpha2Beta1Flat",
    }

    def __init__(
        self, kind: str, name: str | None = None, canonizers=None, exact_merge=True, **box
    ):
        if box and not (kind == "epsilon_gamma_box" and set(box) <= {"low", "high"}):
            raise TypeError(f"zennit:{kind}: unknown options {sorted(box)}")
        params = {"composite": self.COMPOSITES[kind], "exact_merge": exact_merge, **box}
        super().__init__(name or f"zennit:{kind}", "lrp", params)
        self.kind = kind
        self.canonizers = canonizers
        self.exact_merge = exact_merge
        self.box = box
        self.composites = _zennit(".composites")
        self._stats: dict = {}

    def _canonizers(self, model: nn.Module) -> list:
        if self.canonizers is not None:
            return list(self.canonizers)
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return []
        if type(model).__name__ == "ResNet" and type(model).__module__.startswith("torchvision"):
            return [_zennit(".torchvision").ResNetCanonizer()]
        return [_zennit(".canonizers").SequentialMergeBatchNorm()]

    def _attribute(self, problem: Problem) -> Tensor:
        model = _need_model(problem, self.name)
        canon = self._canonizers(model)
        self.params["canonizers"] = [type(c).__name__ for c in canon]
        cls = getattr(self.composites, self.COMPOSITES[self.kind])
        x = _leaf(problem)
        if self.kind == "epsilon_gamma_box":
            lo, hi, _ = data_stats(problem, self._stats)
            lo, hi = self.box.get("low", lo), self.box.get("high", hi)
            composite = cls(
                low=torch.full_like(x, lo), high=torch.full_like(x, hi), canonizers=canon
            )
        else:
            composite = cls(canonizers=canon)
        with composite.context(model):
            patched = []
            try:
                if self.exact_merge:
                    for handle in composite.handles:
                        bn = getattr(handle, "batch_norm", None)
                        if bn is not None:  # restored by the canonizer / below
                            patched.append((bn, bn.eps))
                            bn.running_var.data = torch.full_like(bn.running_var, 0.5)
                            bn.eps = 0.5
                out = problem.forward(x)
                (grad,) = torch.autograd.grad(out, x, _onehot_seed(out, problem.target))
            finally:
                for bn, eps in patched:
                    bn.eps = eps
        return grad


# -- random -----------------------------------------------------------------------------------


class RandomMethod(Method):
    """Uniform ``[0, 1)`` attributions: sample ``i`` of the task gets
    ``numpy.random.default_rng([seed, i]).random(x.shape[1:])`` (PCG64 seeded by the pair), so
    the value does not depend on the batching."""

    def __init__(self, name: str | None = None, seed: int = 0):
        super().__init__(name or "random", "random", {"seed": seed})
        self.seed = seed

    def _attribute(self, problem: Problem) -> Tensor:
        if problem.idx is None:
            raise ValueError(
                "random: problem.idx is needed to seed each sample (Task.problem sets it)"
            )
        x = problem.x
        rows = [
            np.random.default_rng([self.seed, int(i)]).random(tuple(x.shape[1:]))
            for i in problem.idx.tolist()
        ]
        return torch.from_numpy(np.stack(rows)).to(device=x.device, dtype=x.dtype)


# -- LxT (another interpreter) ----------------------------------------------------------------

LXT_FAMILIES = {
    "llama": ("attnlrp", "cp-lrp"),
    "qwen2": ("attnlrp", "cp-lrp"),
    "qwen3": ("attnlrp", "cp-lrp"),
    "gemma3": ("attnlrp", "cp-lrp"),
    "gpt2": ("attnlrp", "cp-lrp"),
    "bert": ("attnlrp",),
}
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lxt_worker.py")


class LxTMethod(Method):
    """LxT 2.1's efficient AttnLRP / CP-LRP: ``x * grad`` of the explained score after
    ``lxt.efficient.monkey_patch`` of the model's transformers module (eager attention), run by
    ``lxt_worker.py`` in the interpreter ``python`` (default ``$DYNAMICLRP_LXT_PYTHON``) that
    has ``lxt`` and transformers 4.52.4, because LxT patches transformers for good.

    Needs ``problem.task.hf`` (see :class:`.task.Task`): ``model`` (a Hugging Face model of a
    family in :data:`LXT_FAMILIES`), ``output``: ``"logits"`` (``model(inputs_embeds=x,
    attention_mask=m).logits``), ``"last"`` (``.logits[:, -1]``) or ``"span"`` (``(B, 1)``:
    ``start_logits[s] + end_logits[e]`` of the sample's ``spans`` row, target 0),
    ``attention_mask`` ``(N, T)`` or None, ``spans`` ``(N, 2)`` for ``"span"``.

    Each call saves the config, the float32 state dict and the batches to a temporary
    directory (deleted afterwards) and starts one process on ``device`` (default "cpu"; threads
    from ``$DYNAMICLRP_LXT_THREADS``, default 1): measured 7-9 s per process for the tiny test
    models on a busy 2-core CPU, nearly all imports and start-up, plus the model's save and load.
    So :meth:`prepare` explains many problems in one process and caches the results that
    :meth:`__call__` then hands out (once each; a problem not prepared runs alone).  The
    worker's scores are checked against ``problem.forward(x)`` (max difference relative to the
    largest score ``<= tol``): a rebuilt model that computes something else is an error.
    """

    def __init__(
        self,
        variant: str,
        name: str | None = None,
        python: str | None = None,
        timeout: float = 1800.0,
        tol: float = 1e-4,
        device: str = "cpu",
    ):
        python = python or os.environ.get("DYNAMICLRP_LXT_PYTHON")
        if not python:
            raise ValueError(
                f"lxt:{variant} needs an interpreter with lxt 2.1 and transformers 4.52.4: pass "
                "python=PATH or set DYNAMICLRP_LXT_PYTHON"
            )
        if not os.path.exists(python):
            raise FileNotFoundError(f"lxt:{variant}: the LxT interpreter {python!r} does not exist")
        params = {"variant": variant, "tol": tol, "device": device}
        super().__init__(name or f"lxt:{variant}", "lrp", params)
        self.variant, self.python, self.timeout, self.tol = variant, python, timeout, tol
        self.device = device
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.last_worker_log = ""
        self.dropped_config_keys: list[str] = []

    @staticmethod
    def _key(problem: Problem) -> tuple:
        return (id(problem.task), tuple(problem.idx.tolist()))

    def _hf(self, problem: Problem) -> dict:
        hf = problem.task.hf if problem.task is not None else None
        if not hf or "model" not in hf or "output" not in hf:
            raise ValueError(f"{self.name}: problem.task.hf must give 'model' and 'output'")
        if problem.idx is None:
            raise ValueError(f"{self.name}: problem.idx is needed to look up masks and spans")
        if hf["output"] not in ("logits", "last", "span"):
            raise ValueError(
                f"{self.name}: task.hf['output'] = {hf['output']!r}; use 'logits', 'last', 'span'"
            )
        parts = type(hf["model"]).__module__.split(".")
        family = parts[2] if parts[:2] == ["transformers", "models"] and len(parts) > 2 else None
        if self.variant not in LXT_FAMILIES.get(family, ()):
            known = {f: v for f, v in LXT_FAMILIES.items()}
            raise ValueError(
                f"{self.name}: LxT 2.1 has no {self.variant} map for {type(hf['model']).__name__}"
                f" (family {family!r}); it has {known}"
            )
        return hf

    def prepare(self, problems: Sequence[Problem]) -> None:
        """Explain ``problems`` (all of one task) in one worker process and keep the results."""
        problems = [p for p in problems if self._key(p) not in self._cache]
        if not problems:
            return
        tasks = {id(p.task) for p in problems}
        if len(tasks) != 1:
            raise ValueError(
                f"{self.name}.prepare: problems of {len(tasks)} tasks; pass one task's"
            )
        task: Task = problems[0].task
        hf = self._hf(problems[0])
        model = hf["model"]
        batches = []
        for p in problems:
            mask, spans = hf.get("attention_mask"), hf.get("spans")
            if hf["output"] == "span" and spans is None:
                raise ValueError(f"{self.name}: output 'span' needs task.hf['spans']")
            batches.append(
                {
                    "x": p.x.detach().float().cpu(),
                    "target": p.target.cpu(),
                    "attention_mask": None if mask is None else mask[p.idx].cpu(),
                    "spans": spans[p.idx].cpu() if hf["output"] == "span" else None,
                }
            )
        job = {
            "variant": self.variant,
            "config_class": type(model.config).__name__,
            "model_class": type(model).__name__,
            "family": type(model).__module__.split(".")[2],
            "config": model.config.to_dict(),
            "state_dict": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
            "output": hf["output"],
            "device": self.device,
            "batches": batches,
        }
        result = self._run(job, task.name)
        self.dropped_config_keys = list(result["dropped"])
        for p, rel, scores in zip(problems, result["relevance"], result["scores"], strict=True):
            with torch.no_grad():
                ref = p.forward(p.x.detach()).float().cpu()
            err = ((scores - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            if scores.shape != ref.shape or err > self.tol:
                raise RuntimeError(
                    f"{self.name}: the model rebuilt under LxT computes other scores than "
                    f"problem.forward (task {task.name!r}, shapes {tuple(scores.shape)} vs "
                    f"{tuple(ref.shape)}, max relative difference {err:.2e} > tol {self.tol}); "
                    f"config keys dropped for the old transformers: {result['dropped']}"
                )
            self._cache[self._key(p)] = (p.x.detach().clone(), rel)

    def _run(self, job: dict, label: str) -> dict:
        tmp = tempfile.mkdtemp(prefix="dynamiclrp-lxt-")
        try:
            torch.save(job, os.path.join(tmp, "job.pt"))
            env = dict(os.environ)
            env.pop("PYTHONPATH", None)  # the other interpreter must not see this environment
            proc = subprocess.run(
                [self.python, WORKER, tmp],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=env,
            )
            self.last_worker_log = proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{self.name}: lxt_worker.py failed on task {label!r} (exit "
                    f"{proc.returncode}, interpreter {self.python}):\n{proc.stderr[-4000:]}"
                )
            return torch.load(os.path.join(tmp, "result.pt"), weights_only=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _attribute(self, problem: Problem) -> Tensor:
        self._hf(problem)
        key = self._key(problem)
        cached = self._cache.get(key)
        if cached is None or not torch.equal(cached[0], problem.x.detach()):
            self._cache.pop(key, None)
            self.prepare([problem])
            cached = self._cache[key]
        del self._cache[key]
        return cached[1].to(device=problem.x.device)


# -- registry ---------------------------------------------------------------------------------


def _registry() -> dict[str, Callable[..., Method]]:
    reg: dict[str, Callable[..., Method]] = {}
    for preset in dynamiclrp.PRESETS:
        reg[f"dynamiclrp:{preset}"] = lambda _p=preset, **kw: DynamicLRPMethod(_p, **kw)
    for kind in CaptumMethod.DEFAULTS:
        reg[kind] = lambda _k=kind, **kw: CaptumMethod(_k, **kw)
    for kind in ZennitMethod.COMPOSITES:
        reg[f"zennit:{kind}"] = lambda _k=kind, **kw: ZennitMethod(_k, **kw)
    reg["random"] = RandomMethod
    for variant in ("attnlrp", "cp-lrp"):
        reg[f"lxt:{variant}"] = lambda _v=variant, **kw: LxTMethod(_v, **kw)
    return reg


REGISTRY = _registry()


def available_methods() -> list[str]:
    """Every name :func:`make_method` accepts."""
    return sorted(REGISTRY)


def make_method(spec: str | dynamiclrp.Rules, **kwargs) -> Method:
    """The method named ``spec`` (see :func:`available_methods`) with options ``kwargs``
    (``name=`` sets the table label); a :class:`dynamiclrp.Rules` object gives a DynamicLRP
    method with those rules."""
    if isinstance(spec, dynamiclrp.Rules):
        return DynamicLRPMethod(spec, **kwargs)
    if spec not in REGISTRY:
        raise ValueError(f"Unknown attribution method {spec!r}; known: {available_methods()}")
    return REGISTRY[spec](**kwargs)


__all__ = [
    "FAMILIES",
    "Method",
    "DynamicLRPMethod",
    "CaptumMethod",
    "ZennitMethod",
    "RandomMethod",
    "LxTMethod",
    "available_methods",
    "make_method",
    "data_stats",
]
