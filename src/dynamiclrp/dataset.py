"""Attribute a whole dataset: relevance shards on disk, an index, resume, data parallel.

>>> result = attribute_dataset(model.eval(), loader, "attributions/", target="predicted")
>>> data = load_attributions("attributions/")  # data.relevance[i]: sample i's relevance

Layout of ``out_dir``
---------------------
``shard-000000.safetensors`` (or ``.npz``)
    The relevance of ``shard_size`` consecutive batches, one tensor per batch under the keys
    ``relevance.0``, ``relevance.1``, ...  (batches of a shard may differ in shape).
``shard-000000.json``
    That shard's metadata, written (atomically) after its data file: ``file``, ``sha256``,
    ``bytes``, ``batches``, ``sample_indices`` (positions in the loader's order), ``shapes`` (one
    per batch), ``dtype``, ``targets`` and ``predictions`` (one int or null per sample),
    ``rank``, ``config_sha256``.  A shard counts as done only when its metadata exists, matches the
    run's configuration and the data file's SHA-256; anything else (a write cut short, a
    corrupted file) is computed again.
``index.json``
    ``config`` (rules, target, inputs_fn, shard_size, format, dtype, the dataset fingerprint:
    length, batch count, SHA-256 and shape of the first batch; the dynamiclrp version),
    ``torch_version``, ``dynamiclrp_version``, ``world_size``, ``complete``, and when complete
    ``num_samples``, ``num_batches`` and ``shards`` (every shard's metadata, in order).  Written
    with ``complete: false`` before any shard, and complete after the last.

Every file is written to a temporary name, flushed to disk and moved into place with
``os.replace``.  Format ``"auto"`` (the default) writes safetensors when the ``safetensors``
package is importable and NPZ otherwise; both hold plain arrays (NPZ files are read with
``allow_pickle=False``; bfloat16 is stored there as its raw 16-bit pattern and restored on load).
A resumed run keeps the format of the existing index.

Distributed: under ``torchrun --nproc_per_node=2 script.py`` with ``torch.distributed``
initialised by the script (gloo on CPU, NCCL on GPU after ``torch.cuda.set_device(local_rank)``),
shard ``k`` is computed by rank ``k % world_size``; each rank writes its own shards and rank 0
writes the index after every rank finished.  ``out_dir`` must be one directory all ranks see.
This module never initialises ``torch.distributed`` itself; a launch that sets ``WORLD_SIZE``
without initialising it is an error.  An error on one rank makes every rank raise.

Resuming compares the whole ``config`` with the stored one: any difference raises
:class:`DatasetConfigError` rather than mixing results.  A callable ``target`` or ``inputs_fn`` is
compared by its qualified name only, a ``ZBox`` rule with tensor bounds by their shape; the torch
version is recorded, not compared.

Devices: each batch goes to ``device`` (default: the device of the model's first parameter) and
nothing else is moved, so a model spread over several GPUs (``device_map="auto"``) runs as it is;
targets follow the output's device and the relevance comes back on the input's device before it
is copied to the CPU for writing.  Only the CPU path is tested (there is one CPU device, so a
model split over two devices cannot be built without GPUs).

Progress: a tqdm bar on rank 0 when ``tqdm`` is installed (an optional dependency); without it,
no bar and no error.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .engine import LRP
from .errors import DynamicLRPError
from .presets import Rules, _storage_key

INDEX_NAME = "index.json"
INDEX_VERSION = 1
FORMATS = ("safetensors", "npz")
_EXT = {"safetensors": "safetensors", "npz": "npz"}
_OWN_FILE = re.compile(r"^shard-\d{6}\.(safetensors|npz|json)$")
_OWN_TMP = re.compile(r"^(shard-\d{6}\.(safetensors|npz|json)|index\.json)\.tmp-\d+$")


class DatasetConfigError(DynamicLRPError, ValueError):
    """``out_dir`` holds results of a different configuration, or the arguments do not fit."""


class DatasetIndexError(DynamicLRPError):
    """An attribution directory is missing, incomplete or corrupted."""


@dataclass(frozen=True)
class DatasetAttribution:
    """What :func:`attribute_dataset` wrote (counts over all ranks)."""

    out_dir: Path
    index_path: Path
    num_samples: int
    num_batches: int
    num_shards: int
    shards_computed: int
    shards_skipped: int
    world_size: int


@dataclass(frozen=True)
class LoadedAttributions:
    """A whole attribution directory, ordered by sample index.

    ``relevance`` is one tensor ``(num_samples, ...)`` when every sample has the same shape, else
    a list of per-sample tensors; ``targets`` and ``predictions`` hold an int or ``None`` per
    sample; ``index`` is the parsed ``index.json``."""

    sample_indices: Tensor
    relevance: Tensor | list[Tensor]
    targets: list[int | None]
    predictions: list[int | None]
    index: dict


def default_inputs(batch) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` from a batch that is a tensor ``x``, ``(x,)`` or ``(x, y)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) in (1, 2) and isinstance(batch[0], Tensor):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise DatasetConfigError(
        f"Cannot find the input in a batch of type {type(batch).__name__}: the default reads a "
        "tensor x, (x,) or (x, y). Pass inputs_fn=lambda batch: (input_tensor, labels_or_None)."
    )


def attribute_dataset(
    model: torch.nn.Module,
    loader: Iterable,
    out_dir: str | os.PathLike,
    *,
    target: str | int | Callable | None = "predicted",
    rules: str | Rules = "dynamiclrp",
    inputs_fn: Callable | None = None,
    shard_size: int = 16,
    format: str = "auto",
    resume: bool = True,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DatasetAttribution:
    """Explain every sample of ``loader`` with LRP and write the relevance to ``out_dir``.

    Parameters
    ----------
    model:
        Called as ``model(x)``; a tensor or an object with ``.logits`` comes back.  Modules in
        training mode are put in eval mode for the run and restored afterwards.  Parameters are
        never moved: a model spread over devices (``device_map="auto"``) stays as it is.
    loader:
        A :class:`~torch.utils.data.DataLoader` with a deterministic order (no ``shuffle=True``)
        or any re-iterable of batches.  With a map-style dataset only the batches still to compute
        are loaded; otherwise every rank iterates all batches and skips the others'.
    out_dir:
        Directory for the shards and ``index.json`` (created if missing).
    target:
        ``"predicted"`` (argmax of the output), ``"label"`` (the batch's labels), an int class,
        ``None`` (seed the output itself), or ``callable(batch, output)`` returning anything
        :func:`dynamiclrp.explain` takes as ``target``.
    rules:
        A preset name or a :class:`~dynamiclrp.presets.Rules` object.
    inputs_fn:
        ``inputs_fn(batch) -> (x, y)``: the floating-point input to explain and the labels (or
        ``None``).  Default: :func:`default_inputs`.
    shard_size:
        Batches per shard (the unit of writing and of resuming).
    format:
        ``"auto"``, ``"safetensors"`` or ``"npz"`` (see the module docstring).
    resume:
        ``True``: keep the shards of an earlier run with the same configuration and compute the
        rest; a different configuration raises :class:`DatasetConfigError`.  ``False``: delete
        this module's files in ``out_dir`` (``index.json``, ``shard-*``) and start over.
    progress:
        A tqdm bar on rank 0 when ``tqdm`` is installed; without it, no bar.
    dtype:
        Storage dtype of the relevance (default: the input's dtype).
    device:
        Where each input batch goes (default: the device of the model's first parameter, the
        input layer under ``device_map="auto"``).  Relevance comes back on the input's device and
        is moved to the CPU for writing.

    Returns
    -------
    :class:`DatasetAttribution` with the paths and counts.
    """
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise DatasetConfigError(f"shard_size must be a positive int (batches), got {shard_size!r}")
    if format not in ("auto", *FORMATS):
        raise DatasetConfigError(f"format must be 'auto', 'safetensors' or 'npz', got {format!r}")
    dist = _Dist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs_fn = inputs_fn or default_inputs
    if device is None:
        device = next((p.device for p in model.parameters()), None)
    source = _Source(loader)
    lrp = LRP(rules)

    def setup() -> dict:
        first = source.first_batch()
        fmt = _resolve_format(format, _read_index(out) if resume else None)
        config = {
            "rules": _describe_rules(lrp.rules, model),
            "target": _describe_target(target),
            "inputs_fn": None if inputs_fn is default_inputs else _qualname(inputs_fn),
            "shard_size": shard_size,
            "format": fmt,
            "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "fingerprint": _fingerprint(source, inputs_fn(first)),
            "dynamiclrp_version": _version(),
        }
        if resume:
            _check_config(out, config)
        return config

    configs = dist.each(setup)
    config = configs[0]
    if any(c != config for c in configs):
        raise DatasetConfigError(
            "The ranks see different data or arguments (their configurations differ): make the "
            "loader's order deterministic and pass the same arguments on every rank."
        )
    config_sha = _sha256(json.dumps(config, sort_keys=True).encode())
    dist.each(lambda: _prepare(out, config, dist.world, resume) if dist.rank == 0 else None)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        work = _Worker(model, lrp, out, config, config_sha, inputs_fn, target, dtype, device, dist)
        counts = dist.each(lambda: work.run(source, progress))
    finally:
        for m, was_training in modes.items():
            m.train(was_training)
    num_batches = counts[0][2]
    num_shards = -(-num_batches // shard_size)
    merged = dist.each(
        lambda: _finish(out, config, num_shards, dist.world) if dist.rank == 0 else 0
    )
    return DatasetAttribution(
        out_dir=out,
        index_path=out / INDEX_NAME,
        num_samples=merged[0],
        num_batches=num_batches,
        num_shards=num_shards,
        shards_computed=sum(c[0] for c in counts),
        shards_skipped=sum(c[1] for c in counts),
        world_size=dist.world,
    )


def load_attributions(out_dir: str | os.PathLike) -> LoadedAttributions:
    """Read a complete attribution directory back, checking every shard's SHA-256."""
    out = Path(out_dir)
    index = _read_index(out)
    if index is None:
        raise DatasetIndexError(f"No {INDEX_NAME} in {out}: not an attribute_dataset directory.")
    if not index.get("complete"):
        raise DatasetIndexError(
            f"{out / INDEX_NAME} is incomplete (the run was interrupted): run attribute_dataset "
            "again with the same arguments to compute the missing shards."
        )
    indices, samples, targets, predictions = [], [], [], []
    for meta in index["shards"]:
        tensors = _decode(_read_verified(out, meta), meta["file"], meta["dtype"])
        for j, shape in enumerate(meta["shapes"]):
            rel = tensors[f"relevance.{j}"]
            if list(rel.shape) != shape:
                raise DatasetIndexError(
                    f"{meta['file']}: relevance.{j} has shape {list(rel.shape)}, the index says "
                    f"{shape}; the directory is corrupted, rerun with resume=False."
                )
            samples.extend(rel.unbind(0))
        indices += meta["sample_indices"]
        targets += meta["targets"]
        predictions += meta["predictions"]
    order = sorted(range(len(indices)), key=indices.__getitem__)
    samples = [samples[i] for i in order]
    same = len({tuple(s.shape) for s in samples}) <= 1
    relevance = torch.stack(samples) if same and samples else samples
    return LoadedAttributions(
        sample_indices=torch.tensor([indices[i] for i in order], dtype=torch.long),
        relevance=relevance,
        targets=[targets[i] for i in order],
        predictions=[predictions[i] for i in order],
        index=index,
    )


# -- the data -------------------------------------------------------------------------------------


class _Source:
    """The loader's batches: planned from the batch sampler (map-style DataLoader) or streamed."""

    def __init__(self, loader: Iterable):
        if isinstance(loader, Iterator):
            raise DatasetConfigError(
                f"loader is a one-pass iterator ({type(loader).__name__}); attribute_dataset reads "
                "it more than once. Pass a DataLoader or another re-iterable of batches."
            )
        self.loader = loader
        self.batches: list[list[int]] | None = None
        if (
            isinstance(loader, DataLoader)
            and not isinstance(loader.dataset, IterableDataset)
            and loader.batch_sampler is not None
        ):
            plan = [list(b) for b in loader.batch_sampler]
            if plan != [list(b) for b in loader.batch_sampler]:
                raise DatasetConfigError(
                    "The loader yields its samples in a different order each time (shuffle=True or "
                    "a random sampler): results could not be resumed or split across ranks. Use a "
                    "DataLoader with shuffle=False."
                )
            self.batches = plan
        self._first = None

    def first_batch(self):
        if self._first is None:
            if self.batches is not None:
                if not self.batches:
                    raise DatasetConfigError("The loader has no batches: nothing to attribute.")
                dataset = self.loader.dataset
                self._first = self.loader.collate_fn([dataset[i] for i in self.batches[0]])
            else:
                for batch in self.loader:
                    self._first = (batch,)
                    break
                else:
                    raise DatasetConfigError("The loader has no batches: nothing to attribute.")
                self._first = self._first[0]
        return self._first

    def length(self) -> int | None:
        try:
            return len(self.loader.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            return None

    def load(self, wanted: list[int]) -> Iterator[tuple[int, object]]:
        """``(batch number, batch)`` for the wanted batches of a planned source, in order."""
        assert self.batches is not None
        loader = self.loader
        params = inspect.signature(DataLoader).parameters
        kwargs = {
            name: getattr(loader, name)
            for name in (
                "num_workers",
                "collate_fn",
                "pin_memory",
                "timeout",
                "worker_init_fn",
                "multiprocessing_context",
                "generator",
                "persistent_workers",
                "pin_memory_device",
                "in_order",
            )
            if name in params and hasattr(loader, name)
        }
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        sub = DataLoader(loader.dataset, batch_sampler=[self.batches[i] for i in wanted], **kwargs)
        yield from zip(wanted, sub, strict=True)


def _fingerprint(source: _Source, first: tuple) -> dict:
    x, y = first
    digest = hashlib.sha256()
    for t in (x, y):
        if isinstance(t, Tensor):
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "length": source.length(),
        "num_batches": None if source.batches is None else len(source.batches),
        "first_batch_shape": list(x.shape) if isinstance(x, Tensor) else None,
        "first_batch_sha256": digest.hexdigest(),
    }


# -- one rank's work ------------------------------------------------------------------------------


class _Worker:
    def __init__(self, model, lrp, out, config, config_sha, inputs_fn, target, dtype, device, dist):
        self.model, self.lrp, self.out, self.config = model, lrp, out, config
        self.config_sha, self.inputs_fn, self.target = config_sha, inputs_fn, target
        self.dtype, self.device, self.dist = dtype, device, dist
        self.size = config["shard_size"]

    def mine(self, shard: int) -> bool:
        return shard % self.dist.world == self.dist.rank

    def run(self, source: _Source, progress: bool) -> tuple[int, int, int]:
        """(shards computed, shards skipped, number of batches) for this rank."""
        if source.batches is not None:
            return self._run_planned(source, progress)
        return self._run_streamed(source, progress)

    def _run_planned(self, source: _Source, progress: bool):
        plan = source.batches
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in plan])]).tolist()
        num_shards = -(-len(plan) // self.size)
        mine = [k for k in range(num_shards) if self.mine(k)]
        todo = [k for k in mine if not self._done(k)]
        wanted = [
            b for k in todo for b in range(k * self.size, min((k + 1) * self.size, len(plan)))
        ]
        bar = _bar(len(wanted), progress and self.dist.rank == 0)
        shard = None
        try:
            for b, batch in source.load(wanted):
                if shard is None or shard.number != b // self.size:
                    shard = _Shard(b // self.size, self.dist.rank)
                shard.add(b, offsets[b], *self._attribute(batch))
                if b == min((shard.number + 1) * self.size, len(plan)) - 1:
                    self._write(shard)
                _tick(bar)
        finally:
            _close(bar)
        return len(todo), len(mine) - len(todo), len(plan)

    def _run_streamed(self, source: _Source, progress: bool):
        bar = _bar(None, progress and self.dist.rank == 0)
        done: dict[int, bool] = {}
        shard, offset, b = None, 0, -1
        try:
            for b, batch in enumerate(source.loader):
                k = b // self.size
                if k not in done:
                    if shard is not None:
                        self._write(shard)
                        shard = None
                    done[k] = not self.mine(k) or self._done(k)
                    if not done[k]:
                        shard = _Shard(k, self.dist.rank)
                if shard is not None:
                    shard.add(b, offset, *self._attribute(batch))
                    _tick(bar)
                offset += int(self.inputs_fn(batch)[0].shape[0])
            if shard is not None:
                self._write(shard)
        finally:
            _close(bar)
        mine = [k for k in done if self.mine(k)]
        skipped = sum(done[k] for k in mine)
        return len(mine) - skipped, skipped, b + 1

    def _attribute(self, batch):
        x, y = self.inputs_fn(batch)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise DatasetConfigError(
                f"inputs_fn must return a floating-point input tensor first, got "
                f"{getattr(x, 'dtype', type(x).__name__)}: to explain token ids, explain the "
                "embedding output instead (dynamiclrp.explain with an intermediate tensor)."
            )
        if self.device is not None:
            x = x.to(self.device)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            output = self.model(x)
            if not isinstance(output, Tensor):
                output = getattr(output, "logits", output)
            if not isinstance(output, Tensor):
                raise DatasetConfigError(
                    f"model(x) returned {type(output).__name__}, not a tensor or an object with "
                    ".logits: wrap the model so it returns the tensor to explain."
                )
            target = _batch_target(self.target, batch, y, output)
            rel = self.lrp.explain(output, x, target)
        n = int(x.shape[0])
        rel = rel.detach().to("cpu", dtype=self.dtype or rel.dtype)
        pred = output.detach().argmax(1).cpu().tolist() if output.dim() == 2 else [None] * n
        return rel, _per_sample(target, n), pred

    def _done(self, k: int) -> bool:
        try:
            meta = json.loads((self.out / f"shard-{k:06d}.json").read_text())
            if meta.get("config_sha256") != self.config_sha:
                return False
            _read_verified(self.out, meta)
        except (OSError, ValueError, KeyError, DatasetIndexError):
            return False
        return True

    def _write(self, shard: _Shard) -> None:
        fmt = self.config["format"]
        name = f"shard-{shard.number:06d}.{_EXT[fmt]}"
        data = _encode({f"relevance.{j}": r for j, r in enumerate(shard.relevance)}, fmt)
        _atomic_write(self.out / name, data)
        meta = {
            "shard": shard.number,
            "file": name,
            "sha256": _sha256(data),
            "bytes": len(data),
            "batches": shard.batches,
            "sample_indices": shard.indices,
            "shapes": [list(r.shape) for r in shard.relevance],
            "dtype": str(shard.relevance[0].dtype).removeprefix("torch."),
            "targets": shard.targets,
            "predictions": shard.predictions,
            "rank": shard.rank,
            "config_sha256": self.config_sha,
        }
        _atomic_write(self.out / f"shard-{shard.number:06d}.json", json.dumps(meta).encode())


class _Shard:
    def __init__(self, number: int, rank: int):
        self.number, self.rank = number, rank
        self.batches: list[int] = []
        self.indices: list[int] = []
        self.relevance: list[Tensor] = []
        self.targets: list = []
        self.predictions: list = []

    def add(self, batch: int, offset: int, rel: Tensor, targets: list, predictions: list) -> None:
        self.batches.append(batch)
        self.indices += range(offset, offset + rel.shape[0])
        self.relevance.append(rel)
        self.targets += targets
        self.predictions += predictions


def _batch_target(target, batch, labels, output: Tensor):
    if isinstance(target, str):
        if target == "predicted":
            if output.dim() != 2:
                raise DatasetConfigError(
                    f'target="predicted" needs a 2-D (batch, classes) output, got shape '
                    f"{tuple(output.shape)}; pass target=callable(batch, output) instead."
                )
            return output.detach().argmax(1)
        if target == "label":
            if labels is None:
                raise DatasetConfigError(
                    'target="label" but the batch has no labels: the default inputs_fn reads '
                    "(x, y) batches; pass inputs_fn returning (x, y) or another target."
                )
            return labels
        raise DatasetConfigError(
            f"target must be 'predicted' or 'label' as a string, got {target!r}"
        )
    if callable(target):
        return target(batch, output)
    return target


def _per_sample(target, n: int) -> list:
    if target is None:
        return [None] * n
    if isinstance(target, Tensor):
        return [int(target)] * n if target.dim() == 0 else [int(t) for t in target.tolist()]
    if isinstance(target, int):
        return [int(target)] * n
    return [int(t) for t in target]


# -- configuration --------------------------------------------------------------------------------


def _describe_rules(rules: Rules, model: torch.nn.Module) -> str:
    """A description of the rules that is the same in every process (overrides by parameter
    name instead of storage address)."""
    if not rules.overrides:
        return repr(rules)
    names = {_storage_key(p): n for n, p in model.named_parameters()}
    overrides = [
        (repr(o.rule), sorted(names.get(k, "<not a parameter of the model>") for k in o.keys))
        for o in rules.overrides
    ]
    return f"{replace(rules, overrides=())!r} overrides={overrides!r}"


def _describe_target(target) -> str:
    if target is None:
        return "none"
    if isinstance(target, str):
        if target not in ("predicted", "label"):
            raise DatasetConfigError(
                f"target must be 'predicted' or 'label' as a string, got {target!r}"
            )
        return target
    if isinstance(target, int) and not isinstance(target, bool):
        return f"class:{target}"
    if callable(target):
        return f"callable:{_qualname(target)}"
    raise DatasetConfigError(
        f"target must be 'predicted', 'label', an int, None or callable(batch, output), got "
        f"{type(target).__name__}."
    )


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _version() -> str:
    import dynamiclrp

    return dynamiclrp.__version__


def _resolve_format(format: str, existing: dict | None) -> str:
    if format == "auto":
        if existing is not None and existing.get("config", {}).get("format") in FORMATS:
            format = existing["config"]["format"]
        else:
            format = "safetensors" if _has_safetensors() else "npz"
    if format == "safetensors" and not _has_safetensors():
        raise DatasetConfigError(
            "format='safetensors' needs the safetensors package (pip install safetensors); "
            "or pass format='npz'."
        )
    return format


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _check_config(out: Path, config: dict) -> None:
    existing = _read_index(out)
    if existing is None:
        strays = sorted(p.name for p in out.iterdir() if _OWN_FILE.match(p.name))
        if strays:
            raise DatasetConfigError(
                f"{out} holds shard files ({strays[0]}, ...) but no {INDEX_NAME}: they are not "
                "from a run this call can resume. Use an empty directory or resume=False."
            )
        return
    old = existing.get("config", {})
    differ = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if differ:
        lines = "; ".join(f"{k}: stored {old.get(k)!r}, now {config.get(k)!r}" for k in differ)
        raise DatasetConfigError(
            f"{out} holds attributions of a different configuration ({lines}). Results are not "
            "mixed: use another out_dir, the same arguments, or resume=False to start over."
        )


def _prepare(out: Path, config: dict, world: int, resume: bool) -> None:
    for p in out.iterdir():
        if _OWN_TMP.match(p.name) or (not resume and _OWN_FILE.match(p.name)):
            p.unlink()
    _write_index(out, {**_header(config, world), "complete": False, "shards": []})


def _finish(out: Path, config: dict, num_shards: int, world: int) -> int:
    shards = []
    for k in range(num_shards):
        path = out / f"shard-{k:06d}.json"
        try:
            shards.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise DatasetIndexError(f"Shard metadata {path} is missing or unreadable: {e}") from e
    num_samples = sum(len(s["sample_indices"]) for s in shards)
    num_batches = sum(len(s["batches"]) for s in shards)
    index = {
        **_header(config, world),
        "complete": True,
        "num_samples": num_samples,
        "num_batches": num_batches,
        "shards": shards,
    }
    _write_index(out, index)
    return num_samples


def _header(config: dict, world: int) -> dict:
    return {
        "index_version": INDEX_VERSION,
        "config": config,
        "dynamiclrp_version": _version(),
        "torch_version": torch.__version__,
        "world_size": world,
    }


# -- files ----------------------------------------------------------------------------------------


def _read_index(out: Path) -> dict | None:
    path = out / INDEX_NAME
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise DatasetIndexError(f"{path} is not valid JSON ({e}); rerun with resume=False.") from e
    if index.get("index_version") != INDEX_VERSION:
        raise DatasetIndexError(
            f"{path} has index_version {index.get('index_version')!r}; this dynamiclrp reads "
            f"version {INDEX_VERSION}. Use another out_dir or resume=False."
        )
    return index


def _write_index(out: Path, index: dict) -> None:
    _atomic_write(out / INDEX_NAME, json.dumps(index, separators=(",", ":")).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_verified(out: Path, meta: dict) -> bytes:
    path = out / meta["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetIndexError(f"Shard file {path} is missing or unreadable: {e}") from e
    if len(data) != meta["bytes"] or _sha256(data) != meta["sha256"]:
        raise DatasetIndexError(
            f"Shard file {path} does not match its SHA-256 in the index (changed or cut short); "
            "rerun attribute_dataset with resume=True to recompute it."
        )
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode(tensors: dict[str, Tensor], fmt: str) -> bytes:
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors)
    arrays = {
        k: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        for k, t in tensors.items()
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _decode(data: bytes, name: str, dtype: str) -> dict[str, Tensor]:
    if name.endswith(".safetensors"):
        if not _has_safetensors():
            raise DatasetIndexError(
                f"{name} is a safetensors file: install safetensors (pip install safetensors)."
            )
        from safetensors.torch import load

        return load(data)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        tensors = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    if dtype == "bfloat16":  # stored as its raw 16-bit pattern (numpy has no bfloat16)
        tensors = {k: t.view(torch.bfloat16) for k, t in tensors.items()}
    return tensors


# -- processes and progress -----------------------------------------------------------------------


class _Dist:
    """This process's rank in an initialised ``torch.distributed`` group, or a group of one."""

    def __init__(self):
        import torch.distributed as dist

        self.on = dist.is_available() and dist.is_initialized()
        if not self.on and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DatasetConfigError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} (a torchrun launch) but torch.distributed "
                "is not initialised, so every process would compute and write every shard. Call "
                'torch.distributed.init_process_group("gloo" or "nccl") before attribute_dataset.'
            )
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def each(self, fn: Callable):
        """Run ``fn`` on every rank and gather the results; if any rank fails, every rank
        raises (the failing rank its own exception), so no rank waits forever."""
        if not self.on:
            return [fn()]
        import torch.distributed as dist

        try:
            mine, error = (True, fn()), None
        except Exception as e:  # gathered below, then re-raised on this rank
            mine, error = (False, f"{type(e).__name__}: {e}"), e
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        if error is not None:
            raise error
        failed = [(r, g[1]) for r, g in enumerate(gathered) if not g[0]]
        if failed:
            rank, message = failed[0]
            raise DynamicLRPError(f"attribute_dataset failed on rank {rank}: {message}")
        return [g[1] for g in gathered]


def _bar(total: int | None, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, desc="attribute_dataset", unit="batch")


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)


def _close(bar) -> None:
    if bar is not None:
        bar.close()
