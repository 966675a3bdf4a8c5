"""LxT 2.1 baselines of :mod:`.methods` (``lxt:attnlrp``, ``lxt:cp-lrp``), run in another
interpreter by ``lxt_worker.py`` because LxT patches transformers for good (:class:`LxTMethod`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import torch
from torch import Tensor

from ._method_base import Method
from .task import Problem, Task

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
