"""What an evaluation needs to know about a model and its data: :class:`Task` and :class:`Problem`.

Every task, whatever its modality, is reduced to one shape so that every metric and every
attribution method sees the same thing:

- ``task.inputs`` are what the dataset holds (images, or token ids);
- ``task.to_x(inputs)`` turns a batch of them into the float tensor that is attributed (the
  images themselves, or the input embeddings of the tokens);
- ``task.forward(x, idx)`` maps that float tensor for the samples ``idx`` (a 1-D LongTensor of
  row numbers into the task, so per-sample attention masks or spans can be looked up) to a 2-D
  ``(batch, classes)`` score tensor, and ``task.targets[idx]`` says which column is explained.

An attribution method receives a :class:`Problem` (one batch) and returns a tensor of ``x``'s
shape; :func:`feature_relevance` pools it to one number per pixel or token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Task:
    """A trained model and a labelled set to evaluate attributions on.

    Attributes
    ----------
    name:
        Short identifier, e.g. ``"digits-cnn"``.
    kind:
        ``"image"`` (inputs ``(N, C, H, W)`` float) or ``"tokens"`` (inputs ``(N, T)`` long).
    model:
        The model in eval mode (owning the parameters; Zennit hooks are registered on it).
    inputs:
        The evaluation samples.
    targets:
        ``(N,)`` long: the column of ``forward``'s output that is explained for each sample
        (usually the model's predicted class).
    labels:
        ``(N,)`` long: the gold labels (for accuracy), may equal ``targets``.
    to_x:
        ``inputs -> x``: the float tensor attributions are computed for.
    forward:
        ``(x, idx) -> (batch, classes)`` scores; ``idx`` are the rows of ``inputs`` in the batch.
    score:
        ``"probability"`` (softmax over the columns, the default) or ``"logit"`` (the raw
        column, used where the output is a single score such as a similarity).
    evidence:
        Optional bool ground truth of what decides the label: ``(N, H, W)`` or ``(N, T)``.
    rankable:
        Optional ``(N, T)`` bool: tokens that may be ranked and perturbed (never padding or
        special tokens).  ``None`` means every feature.
    replacement_id:
        Token id that replaces a perturbed token (mask, unk or pad id).
    patch:
        Image perturbation unit in pixels (1 = pixels, 16 = ViT patches).
    replacement:
        What replaces a perturbed image feature for this task (``"blur"``, ``"mean"``,
        ``"zero"``); ``None`` leaves the choice to the caller (the paper's blur).
    spans:
        Optional ``(N, 2)`` gold answer spans (inclusive token indices) for extractive QA.
    predicted_spans:
        Optional ``(N, 2)`` predicted spans for extractive QA.
    question:
        Optional ``(N, T)`` bool: question tokens (their relevance is masked before ranking).
    hf:
        Optional information for methods that rebuild the model in another process (LxT):
        ``{"model": hf_model, "output": "logits" | "last" | "span", "attention_mask": (N, T) or
        None, "spans": (N, 2) for "span"}`` ("span": the score ``start_logits[s] + end_logits[e]``
        of the sample's span as a ``(B, 1)`` output, target 0).
    info:
        Free-form facts to report (accuracy, parameter count, training time).
    """

    name: str
    kind: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    labels: Tensor
    to_x: Callable[[Tensor], Tensor]
    forward: Callable[[Tensor, Tensor], Tensor]
    score: str = "probability"
    evidence: Tensor | None = None
    rankable: Tensor | None = None
    replacement_id: int | None = None
    patch: int = 1
    replacement: str | None = None
    spans: Tensor | None = None
    predicted_spans: Tensor | None = None
    question: Tensor | None = None
    hf: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def problem(self, idx: Tensor) -> Problem:
        """The attribution problem for the rows ``idx``."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        with torch.no_grad():
            x = self.to_x(self.inputs[idx]).detach()
        return Problem(
            forward=lambda x_, _idx=idx: self.forward(x_, _idx),
            x=x,
            target=self.targets[idx],
            model=self.model,
            idx=idx,
            task=self,
        )


@dataclass
class Problem:
    """One batch to attribute: ``forward(x)`` is ``(batch, classes)``, explain column ``target``."""

    forward: Callable[[Tensor], Tensor]
    x: Tensor
    target: Tensor
    model: nn.Module | None = None
    idx: Tensor | None = None
    task: Task | None = None


def feature_relevance(relevance: Tensor, kind: str) -> Tensor:
    """Pool an attribution of ``x``'s shape to one value per pixel ``(N, H, W)`` (sum over
    channels) or per token ``(N, T)`` (sum over the embedding dimension)."""
    if kind == "image":
        return relevance.sum(1)
    if kind == "tokens":
        return relevance.sum(-1)
    raise ValueError(f"feature_relevance: unknown task kind {kind!r}; expected 'image' or 'tokens'")
