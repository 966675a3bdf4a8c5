"""The paper's own setups (section 5, tables 1 and A.1-A.3) as :class:`Task`\\ s, from local files.

Nothing is downloaded: every model, tokenizer and data set is read from a path given by the user
(Hugging Face models with ``from_pretrained(path, local_files_only=True)``).  A missing file
raises an error that names it and the layout that was expected.  ``REAL_TASKS[name](**paths)``
builds a task; :func:`parse_spec` builds one from a command-line string::

    vgg16-imagenette:model=/p/vgg16-397923af.pth,data=/p/imagenette2-320/val
    vit-cifar10:model=/p/vit-b16-cifar10,data=/p/cifar-10-batches-bin
    llama-imdb:model=/p/llama-3.2-1b-imdb,data=/p/aclImdb
    llama-wikipedia:model=/p/Llama-3.2-1B,data=/p/wikipedia-en-txt
    squad-qa:model=/p/roberta-large-squad2,data=/p/dev-v2.0.json

Setups (``n_eval`` is the number of evaluation samples, ``None`` = all of them):

- ``vgg16-imagenette`` (:func:`build_vgg16_imagenette`): torchvision ``vgg16()`` with a state
  dict file, on an ImageFolder directory (ImageNette ``val``: one folder per class, named by
  WordNet id, mapped to ImageNet indices by :data:`IMAGENETTE_CLASSES`); shorter side resized to
  ``resize`` (320) and a ``crop`` (224) centre crop, ImageNet normalisation; perturbation unit
  1 pixel; targets = the predicted ImageNet class.
- ``vit-cifar10`` (:func:`build_vit_cifar10`): a ViT-B/16 fine-tuned on CIFAR-10 (a torchvision
  ``vit_b_16(num_classes=10)`` state dict file, or a Hugging Face ``ViTForImageClassification``
  directory) on CIFAR-10's python ``test_batch``, upsampled bilinearly to 224; perturbation unit
  = the model's patch size (16).
- ``llama-imdb`` (:func:`build_llama_imdb`): a Hugging Face sequence classifier on IMDB
  (``aclImdb/test/{pos,neg}/*.txt``, or a jsonl / csv file with ``text`` and ``label``),
  truncated to ``max_len`` tokens, padded to the longest evaluated review (never to a fixed
  length); pad and special tokens are never ranked.
- ``llama-wikipedia`` (:func:`build_llama_wikipedia`): a causal LM on windows of ``ctx`` tokens
  of local ``.txt`` files; the explained class is the gold next token.
- ``squad-qa`` (:func:`build_squad_qa`): a Hugging Face extractive QA model (RoBERTa, BERT, T5
  ``T5ForQuestionAnswering``) on the answerable questions of SQuAD v2's ``dev-v2.0.json``.

Every token task uses ``attn_implementation="eager"`` by default (explained under
:func:`dynamiclrp.record`; LxT needs it) and fills ``task.hf`` as in ``benchmarks/tasks/text.py``.

The builders live in :mod:`.real_images` (VGG16 / ImageNette, ViT / CIFAR-10),
:mod:`.real_text` (IMDB, Wikipedia) and :mod:`.real_qa` (SQuAD); this module holds the registry :data:`REAL_TASKS` and :func:`parse_spec`, and re-exports the
builders and helpers.  The shared helpers live in :mod:`.real_common`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from dynamiclrp.evaluation.task import Task

from . import real_common  # noqa: F401  (the module whose torchvision_model the builders call)
from .real_common import (  # noqa: F401  (re-exported: the builders' shared helpers)
    _batched,
    _check_n_eval,
    _dtype,
    _hf_model,
    _hf_tokenizer,
    _image_task,
    _n_params,
    _pad,
    _pad_id,
    _replacement_id,
    _require,
    _special_mask,
    _token_task,
    torchvision_model,
)

# ---------------------------------------------------------------------------------------------
# registry and command-line specs
from .real_images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENETTE_CLASSES,
    build_vgg16_imagenette,
    build_vit_cifar10,
    load_state_dict,
)
from .real_images import _resize_crop as _resize_crop  # used by the tests
from .real_qa import build_squad_qa, normalize_answer, predict_span, squad_scores
from .real_text import build_llama_imdb, build_llama_wikipedia

REAL_TASKS: dict[str, Callable[..., Task]] = {
    "vgg16-imagenette": build_vgg16_imagenette,
    "vit-cifar10": build_vit_cifar10,
    "llama-imdb": build_llama_imdb,
    "llama-wikipedia": build_llama_wikipedia,
    "squad-qa": build_squad_qa,
}
"""``name -> build(model=..., data=..., n_eval=..., **options) -> Task`` (keyword arguments)."""


def _convert(value: str, hint: Any, key: str, name: str) -> Any:
    """A spec value as the builder's parameter type (``int``, ``float``, ``bool``, ``str``,
    ``tuple[float, ...]`` written ``a/b/c``, optionally ``| None`` written ``none``)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value.lower() == "none":
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(value)
        if typing.get_origin(hint) is tuple:
            return tuple(float(v) for v in value.split("/"))
    except ValueError as err:
        raise ValueError(f"{name}: {key}={value!r} is not a valid {hint}") from err
    raise TypeError(f"{name}: option {key} has the unsupported type {hint}")


def parse_spec(spec: str, n_eval: int | None = None) -> Task:
    """Build a task from ``"name:key=value,key=value"`` (e.g.
    ``"vgg16-imagenette:model=/p/vgg16.pth,data=/p/imagenette2-320/val"``).

    ``name`` is a key of :data:`REAL_TASKS`; the keys are its builder's keyword arguments, the
    values converted to their types (tuples as ``0.5/0.5/0.5``, ``none`` for None; a value ends
    at the next comma, so paths may not contain commas).  ``n_eval``
    (e.g. the benchmark's ``--n``) is passed unless it is None or the spec sets ``n_eval``
    itself (the spec wins).
    """
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in REAL_TASKS:
        raise KeyError(f"real task {name!r} unknown in spec {spec!r}; known: {sorted(REAL_TASKS)}")
    build = REAL_TASKS[name]
    hints = typing.get_type_hints(build)
    params = inspect.signature(build).parameters
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"{name}: {item!r} in spec {spec!r} is not key=value")
        if key not in params:
            raise KeyError(f"{name}: unknown option {key!r}; options: {list(params)}")
        kwargs[key] = _convert(value.strip(), hints[key], key, name)
    if n_eval is not None and "n_eval" not in kwargs:
        kwargs["n_eval"] = n_eval
    missing = [
        p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs
    ]
    if missing:
        raise ValueError(
            f"{name}: spec {spec!r} lacks {missing} (e.g. {name}:model=PATH,data=PATH)"
        )
    return build(**kwargs)


__all__ = [
    "IMAGENETTE_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REAL_TASKS",
    "build_llama_imdb",
    "build_llama_wikipedia",
    "build_squad_qa",
    "build_vgg16_imagenette",
    "build_vit_cifar10",
    "load_state_dict",
    "normalize_answer",
    "parse_spec",
    "predict_span",
    "squad_scores",
    "torchvision_model",
]
