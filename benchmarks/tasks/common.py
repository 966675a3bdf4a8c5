"""Shared helpers of the benchmark tasks: deterministic training, a model cache, accuracy.

Every model of the faithfulness benchmark is trained here, on the CPU, with fixed seeds, and
cached on disk so that a second run of the benchmark loads it instead of training it again.

- :func:`cache_dir` is where the cache lives (``$DYNAMICLRP_CACHE``, by default
  ``~/.cache/dynamiclrp/faithfulness``).
- :func:`train_classifier` trains a model with Adam and a cross-entropy (or binary) loss.
- :func:`cached` builds a model, and either loads its weights from the cache or trains it and
  stores them (with the training statistics as JSON beside them); :func:`cached_stats` reads
  those statistics back.
- :func:`accuracy` is the fraction of samples whose arg-max class is the label.

None of these functions changes the number of torch threads: the caller sets it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Inputs = Tensor | tuple[Tensor, ...]
"""A batch of model inputs: one tensor, or a tuple passed as ``model(*inputs)``."""

DataSource = tuple[Inputs, Tensor] | Callable[[int], tuple[Inputs, Tensor]]
"""Training data: fixed ``(X, y)`` tensors, or ``make_batch(epoch) -> (X, y)`` that returns the
whole training set of one epoch (e.g. freshly generated synthetic samples)."""

LOSSES = ("ce", "bce")


def cache_dir() -> Path:
    """The directory of cached models: ``$DYNAMICLRP_CACHE`` or ``~/.cache/dynamiclrp/faithfulness``.

    It is created if it does not exist.
    """
    env = os.environ.get("DYNAMICLRP_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "dynamiclrp" / "faithfulness"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_tuple(x: Inputs) -> tuple[Tensor, ...]:
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, tuple) and all(isinstance(t, Tensor) for t in x):
        return x
    raise TypeError(
        f"model inputs must be a Tensor or a tuple of Tensors, got {type(x).__name__}; "
        "pass several inputs as a tuple, they are given to the model as model(*inputs)"
    )


def _n_rows(xs: tuple[Tensor, ...], y: Tensor) -> int:
    n = int(y.shape[0])
    for i, t in enumerate(xs):
        if t.shape[0] != n:
            raise ValueError(
                f"input {i} has {t.shape[0]} rows but the labels have {n}; "
                "every input tensor must have one row per label"
            )
    return n


def _loss(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype).reshape(logits.shape))
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def _n_correct(logits: Tensor, y: Tensor, loss: str) -> int:
    if loss == "ce":
        return int((logits.argmax(-1) == y).sum())
    pred = (logits.reshape(y.shape) > 0).to(y.dtype)
    return int((pred == y).sum())


def train_classifier(
    model: nn.Module,
    data: DataSource,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    loss: str = "ce",
    cosine: bool = False,
    warmup: int = 0,
    clip: float | None = None,
    forward: Callable[[nn.Module, tuple[Tensor, ...]], Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with Adam (or AdamW if ``weight_decay > 0``), deterministically.

    Parameters
    ----------
    model:
        The model; it is put in train mode for training and left in eval mode afterwards.
    data:
        ``(X, y)`` (``X`` a tensor or a tuple of tensors, one row per sample), or a callable
        ``make_batch(epoch) -> (X, y)`` returning the training set of that epoch.
    epochs, lr, batch_size:
        Number of passes over the data, learning rate, mini-batch size.  Each epoch visits the
        samples in a random order drawn from a generator seeded with ``seed + epoch``.
    seed:
        ``torch.manual_seed(seed)`` is called first (dropout and any other global randomness).
    weight_decay:
        Decoupled weight decay (AdamW); 0 means plain Adam.
    loss:
        ``"ce"``: cross-entropy of ``(batch, classes)`` logits against long labels;
        ``"bce"``: binary cross-entropy with logits against 0/1 labels of the logits' shape.
    cosine:
        If true the learning rate follows ``lr * (1 + cos(pi * t / T)) / 2`` over the ``T``
        optimisation steps (``t`` the step index); otherwise it stays ``lr``.
    warmup:
        Number of warm-up steps: the learning rate above is multiplied by
        ``min(1, (t + 1) / warmup)``; 0 means none.
    clip:
        If given, the gradient norm is clipped to this value at each step.
    forward:
        ``forward(model, inputs) -> logits``; by default ``model(*inputs)``.

    Returns
    -------
    dict
        ``loss`` and ``accuracy``: mean loss and training accuracy of the last epoch (measured
        on the fly, in train mode); ``seconds``: wall-clock training time; ``epochs``, ``steps``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be at least 1")
    call = forward if forward is not None else (lambda m, xs: m(*xs))
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay > 0:
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr)

    def epoch_data(epoch: int) -> tuple[tuple[Tensor, ...], Tensor]:
        x, y = data(epoch) if callable(data) else data
        return _as_tuple(x), y

    xs, y = epoch_data(0)
    steps_per_epoch = math.ceil(_n_rows(xs, y) / batch_size)
    total = steps_per_epoch * epochs
    step = 0
    start = time.perf_counter()
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for epoch in range(epochs):
        if epoch > 0:
            xs, y = epoch_data(epoch)
        n = _n_rows(xs, y)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            if cosine or warmup:
                factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
                if cosine:
                    factor *= 0.5 * (1.0 + math.cos(math.pi * step / total))
                for group in opt.param_groups:
                    group["lr"] = lr * factor
            logits = call(model, tuple(t[idx] for t in xs))
            value = _loss(logits, y[idx], loss)
            opt.zero_grad(set_to_none=True)
            value.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            step += 1
            loss_sum += float(value.detach()) * len(idx)
            correct += _n_correct(logits.detach(), y[idx], loss)
            seen += len(idx) * (1 if loss == "ce" else int(y[idx][0].numel()))
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"training diverged in epoch {epoch}: the loss is {loss_sum}; lower lr ({lr}) "
                "or set clip"
            )
    model.eval()
    return {
        "loss": loss_sum / max(int(y.shape[0]), 1),
        "accuracy": correct / max(seen, 1),
        "seconds": time.perf_counter() - start,
        "epochs": epochs,
        "steps": step,
    }


@torch.no_grad()
def accuracy(
    model: nn.Module,
    X: Inputs,
    y: Tensor,
    batch_size: int = 256,
    forward: Callable[[nn.Module, tuple[Tensor, ...]], Tensor] | None = None,
) -> float:
    """Fraction of rows whose arg-max logit is the label, ``mean_i [argmax_c f(x_i)_c = y_i]``.

    The model is evaluated in eval mode and left in eval mode.
    """
    call = forward if forward is not None else (lambda m, xs: m(*xs))
    xs = _as_tuple(X)
    n = _n_rows(xs, y)
    if n == 0:
        raise ValueError("accuracy: the evaluation set is empty")
    model.eval()
    hits = 0
    for b in range(0, n, batch_size):
        logits = call(model, tuple(t[b : b + batch_size] for t in xs))
        hits += int((logits.argmax(-1) == y[b : b + batch_size]).sum())
    return hits / n


def cache_key(name: str, config: dict[str, Any]) -> str:
    """``name-<16 hex digits>``: a SHA-256 of the JSON of ``config`` plus torch's major.minor.

    ``config`` must be JSON-serialisable (numbers, strings, lists, dicts).
    """
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"cache name {name!r} must be non-empty, without slashes or spaces")
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    try:
        text = json.dumps({"config": config, "torch": torch_version}, sort_keys=True)
    except TypeError as err:
        raise TypeError(
            f"the config of {name!r} is not JSON-serialisable ({err}); use plain numbers, "
            "strings, lists and dicts"
        ) from err
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _paths(name: str, config: dict[str, Any]) -> tuple[Path, Path]:
    key = cache_key(name, config)
    root = cache_dir()
    return root / f"{key}.pt", root / f"{key}.json"


def cached(
    name: str,
    config: dict[str, Any],
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], dict[str, Any]],
    *,
    refresh: bool = False,
) -> nn.Module:
    """Build a model and load its trained weights from the cache, or train and cache them.

    Parameters
    ----------
    name:
        Cache name of the model, e.g. ``"digits-vgg"``.
    config:
        Everything that determines the trained weights (architecture, data, epochs, seeds); it
        must contain ``"seed"``.  The cache key is ``name`` plus a hash of ``config`` and of
        torch's major.minor version (:func:`cache_key`).
    build:
        Returns a fresh, untrained model.  It is called right after
        ``torch.manual_seed(config["seed"])``, so its initialisation is deterministic.
    train:
        Trains the model in place and returns JSON-serialisable statistics (e.g. the dict of
        :func:`train_classifier`); they are stored beside the weights, see :func:`cached_stats`.
    refresh:
        Train again even if the cache holds the model.

    Returns
    -------
    nn.Module
        The trained model in eval mode.
    """
    if "seed" not in config:
        raise KeyError(f"the config of {name!r} has no 'seed'; add the seed that build() uses")
    weights, stats_path = _paths(name, config)
    torch.manual_seed(int(config["seed"]))
    model = build()
    if weights.exists() and stats_path.exists() and not refresh:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        return model.eval()
    stats = train(model)
    if not isinstance(stats, dict):
        raise TypeError(f"train() of {name!r} returned {type(stats).__name__}, expected a dict")
    # Write to temporary names and rename, so that concurrent runs never read a partial file.
    tmp_w = weights.with_suffix(f".pt.tmp{os.getpid()}")
    tmp_s = stats_path.with_suffix(f".json.tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp_w)
    tmp_s.write_text(json.dumps({"name": name, "config": config, "stats": stats}, indent=1))
    os.replace(tmp_w, weights)
    os.replace(tmp_s, stats_path)
    return model.eval()


def cached_stats(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The training statistics that :func:`cached` stored for ``name`` and ``config``."""
    _, stats_path = _paths(name, config)
    if not stats_path.exists():
        raise FileNotFoundError(
            f"no cached training statistics for {name!r} at {stats_path}; call cached() first"
        )
    return json.loads(stats_path.read_text())["stats"]


def n_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters())
