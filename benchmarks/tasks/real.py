"""The paper's own setups (section 5, tables 1 and A.1-A.3) as :class:`Task`\\ s, from local files.

Nothing is downloaded: every model, tokenizer and data set is read from a path given by the user
(Hugging Face models with ``from_pretrained(path, local_files_only=True)``).  A missing file
raises an error that names it and the layout that was expected.  ``REAL_TASKS[name](**paths)``
builds a task; :func:`parse_spec` builds one from a command-line string::

    vgg16-imagenette:model=/p/vgg16-397923af.pth,data=/p/imagenette2-320/val
    vit-cifar10:model=/p/vit-b16-cifar10,data=/p/cifar-10-batches-py
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
"""

from __future__ import annotations

import collections
import csv
import inspect
import json
import pickle
import re
import string
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamiclrp.evaluation.task import Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet channel statistics (torchvision's ``Normalize`` of its ImageNet weights)."""

IMAGENETTE_CLASSES: dict[str, int] = {
    "n01440764": 0,  # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888605": 701,  # parachute
}
"""ImageNette's ten WordNet ids (its folder names) -> their ImageNet-1k class indices."""

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


# ---------------------------------------------------------------------------------------------
# loading helpers


def _require(path: str | Path, what: str, layout: str) -> Path:
    """``path`` as a :class:`Path`, or a ``FileNotFoundError`` naming it and the layout."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p} does not exist; expected {layout}")
    return p


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dtype


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_n_eval(name: str, n_eval: int | None, available: int) -> int:
    if n_eval is None:
        return available
    if not 1 <= n_eval <= available:
        raise ValueError(f"{name}: n_eval={n_eval} must be in [1, {available}] (samples found)")
    return n_eval


def torchvision_model(arch: str, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, **kwargs)``: the architecture only.

    The image builders create their model through this function (tests replace it by a tiny
    model of the same interface).
    """
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            f"the {arch} setup needs torchvision (pip install torchvision); it is not installed"
        ) from err
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def load_state_dict(model: nn.Module, path: str | Path, arch: str) -> nn.Module:
    """Load the state dict saved in ``path`` (``torch.save(model.state_dict())``, or a dict
    holding it under ``"state_dict"`` or ``"model"``) into ``model``, strictly."""
    p = _require(path, f"{arch} weights", f"a state dict file saved by torch.save for {arch}")
    if p.is_dir():
        raise IsADirectoryError(f"{arch} weights: {p} is a directory; pass the state dict file")
    state = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and set(state) >= {key} and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TypeError(f"{p} holds a {type(state).__name__}, not a state dict for {arch}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{p} is not a state dict of {arch}: {err}") from err
    return model.eval()


def _hf_model(auto: str, path: str | Path, attn: str, dtype: str) -> nn.Module:
    import transformers

    p = _require(path, "model", "a Hugging Face model directory (config.json + weights)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model: {p} has no config.json; expected a directory written by save_pretrained "
            "(config.json and model.safetensors or pytorch_model.bin)"
        )
    cls = getattr(transformers, auto)
    version = tuple(int(v) for v in re.findall(r"\d+", transformers.__version__)[:2])
    key = "dtype" if version >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    kwargs = {key: _dtype(dtype)}
    model = cls.from_pretrained(str(p), local_files_only=True, attn_implementation=attn, **kwargs)
    return model.eval()


def _hf_tokenizer(path: str | Path, fast: bool = False) -> Any:
    from transformers import AutoTokenizer

    p = _require(path, "tokenizer", "a directory with tokenizer.json / tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if fast and not tok.is_fast:
        raise TypeError(
            f"tokenizer in {p} is a slow {type(tok).__name__}; extractive QA needs a fast "
            "tokenizer (tokenizer.json) for character offsets"
        )
    return tok


def _special_mask(tok: Any, ids: Tensor) -> Tensor:
    """``(N, T)`` bool: the ids that are one of the tokenizer's special tokens."""
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=ids.dtype)
    return torch.isin(ids, special)


def _pad(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """Pad token-id rows to the longest on ``side``: ``(ids, attention_mask)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _pad_id(tok: Any, model: nn.Module) -> int:
    for pid in (tok.pad_token_id, getattr(model.config, "pad_token_id", None)):
        if pid is not None:
            return int(pid)
    raise ValueError(
        "neither the tokenizer nor the model config defines a pad token id; sequences of "
        "different lengths must be padded (the pad positions are masked and never ranked): set "
        "tokenizer.pad_token (e.g. to the eos token) and save it, or set config.pad_token_id"
    )


def _replacement_id(tok: Any, replacement: str) -> int:
    """The id that replaces perturbed tokens: ``"unk"``, ``"pad"``, ``"mask"``, ``"eos"``, an
    integer, or ``"auto"`` = the tokenizer's unk token, else its pad token (else an error)."""
    if replacement == "auto":
        order = ["unk", "pad"]
    elif replacement in ("unk", "pad", "mask", "eos"):
        order = [replacement]
    elif replacement.lstrip("-").isdigit():
        return int(replacement)
    else:
        raise ValueError(f"replacement={replacement!r}; use auto, unk, pad, mask, eos or an id")
    for kind in order:
        tid = getattr(tok, f"{kind}_token_id")
        if tid is not None:
            return int(tid)
    raise ValueError(
        f"the tokenizer has no {' or '.join(order)} token for replacement={replacement!r} (the "
        "Llama-3 tokenizer has neither unk nor pad): pass replacement=eos or an explicit token id"
    )


def _batched(fn: Callable[[slice], Tensor], n: int, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(slice(b, b + batch_size)) for b in range(0, n, batch_size)])


# ---------------------------------------------------------------------------------------------
# images


def _resize_crop(img: Any, resize: int, crop: int) -> Tensor:
    """torchvision's ``Resize(resize)`` (shorter side, bilinear) then ``CenterCrop(crop)`` on a
    PIL image, as a ``(3, crop, crop)`` float tensor in ``[0, 1]``."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    if crop > min(w, h):
        raise ValueError(f"crop={crop} is larger than the resized image {w}x{h} (resize={resize})")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(crop, crop, 3).permute(2, 0, 1).float() / 255.0


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _image_task(
    name: str,
    model: nn.Module,
    call: Callable[[Tensor], Tensor],
    x: Tensor,
    labels: Tensor,
    patch: int,
    batch_size: int,
    info: dict[str, Any],
) -> Task:
    pred = _batched(lambda s: call(x[s]).argmax(-1), len(x), batch_size)
    info = {"accuracy": float((pred == labels).float().mean()), "params": _n_params(model), **info}
    return Task(
        name=name,
        kind="image",
        model=model,
        inputs=x,
        targets=pred,
        labels=labels,
        to_x=lambda t: t,
        forward=lambda x_, idx: call(x_),
        patch=patch,
        info=info,
    )


def _image_folder(root: Path, classes: dict[str, int]) -> list[tuple[Path, int]]:
    layout = "an ImageFolder directory (e.g. imagenette2-320/val) with one folder per class"
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    if not folders:
        raise FileNotFoundError(f"data: {root} has no class folders; expected {layout}")
    unknown = [d.name for d in folders if d.name not in classes]
    if unknown:
        raise ValueError(
            f"data: folders {unknown} of {root} are not ImageNette WordNet ids "
            f"{sorted(classes)}; expected {layout} (pass .../imagenette2-320/val, not its parent)"
        )
    items = [
        (f, classes[d.name])
        for d in folders
        for f in sorted(d.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise FileNotFoundError(f"data: no image files ({sorted(IMAGE_SUFFIXES)}) under {root}")
    return items


def build_vgg16_imagenette(
    model: str,
    data: str,
    n_eval: int | None = 3800,
    arch: str = "vgg16",
    resize: int = 320,
    crop: int = 224,
    seed: int = 0,
    batch_size: int = 32,
) -> Task:
    """``vgg16-imagenette``: torchvision ``vgg16()`` (``arch``) with the state dict ``model`` on
    ImageNette's validation ImageFolder ``data``.

    Preprocessing: the shorter side is resized to ``resize`` pixels (bilinear), a ``crop`` x
    ``crop`` centre crop is taken, and ``x = (rgb / 255 - mean) / std`` with the ImageNet
    statistics (torchvision's ``Resize``, ``CenterCrop``, ``Normalize``; ``resize=256`` gives
    torchvision's own evaluation transform of its VGG16 weights).  The images are taken in the
    order of a ``seed``-ed permutation of the sorted file list (so any ``n_eval`` mixes the
    classes); ``labels`` are the folders' ImageNet indices (:data:`IMAGENETTE_CLASSES`),
    ``targets`` the predicted class among all 1000; perturbation unit 1 pixel.
    """
    root = _require(data, "data", "ImageNette's val directory (class folders n01440764, ...)")
    items = _image_folder(root, IMAGENETTE_CLASSES)
    n = _check_n_eval("vgg16-imagenette", n_eval, len(items))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n]
    from PIL import Image

    images = []
    for i in order.tolist():
        with Image.open(items[i][0]) as img:
            images.append(_resize_crop(img, resize, crop))
    x = _normalise(torch.stack(images), IMAGENET_MEAN, IMAGENET_STD)
    labels = torch.tensor([items[i][1] for i in order.tolist()], dtype=torch.long)
    net = load_state_dict(torchvision_model(arch), model, arch)
    info = {
        "images_found": len(items),
        "preprocessing": f"resize {resize} (shorter side), centre crop {crop}, ImageNet mean/std",
        "weights": str(model),
        "accuracy_over": "1000 ImageNet classes",
    }
    return _image_task("vgg16-imagenette", net, net, x, labels, 1, batch_size, info)


def _cifar_test(path: Path) -> tuple[Tensor, Tensor]:
    layout = "CIFAR-10's python directory cifar-10-batches-py/ holding test_batch (or that file)"
    f = path / "test_batch" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"data: {f} does not exist; expected {layout}")
    with open(f, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
        raise ValueError(f"data: {f} is not a CIFAR-10 python batch (dict with b'data', b'labels')")
    pixels = torch.as_tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32)
    return pixels.float() / 255.0, torch.as_tensor(batch[b"labels"], dtype=torch.long)


def build_vit_cifar10(
    model: str,
    data: str,
    n_eval: int | None = 1000,
    size: int = 224,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    attn: str = "eager",
    batch_size: int = 32,
) -> Task:
    """``vit-cifar10``: a ViT-B/16 fine-tuned on CIFAR-10, on the first ``n_eval`` test images.

    ``model`` is a torchvision ``vit_b_16(num_classes=10)`` state dict file, or a directory of a
    Hugging Face ``ViTForImageClassification`` (``save_pretrained``; its ``image_size`` must be
    ``size``).  Each 32x32 image is upsampled to ``size`` x ``size`` (bilinear,
    ``align_corners=False``) and normalised ``(x - mean) / std``; ``mean``/``std`` default to the
    Hugging Face directory's ``preprocessor_config.json`` (``image_mean``/``image_std``) if it
    has one, else to the ImageNet statistics (``info["normalisation"]`` says which).  The
    perturbation unit is the model's patch size; ``targets`` are the predicted classes.
    """
    if (mean is None) != (std is None):
        raise ValueError(f"vit-cifar10: give both mean and std or neither (mean={mean}, std={std})")
    path = _require(model, "model", "a vit_b_16 state dict file or a Hugging Face ViT directory")
    x32, labels = _cifar_test(_require(data, "data", "cifar-10-batches-py/ with test_batch"))
    n = _check_n_eval("vit-cifar10", n_eval, len(labels))
    source = "ImageNet"
    if path.is_dir():
        net = _hf_model("AutoModelForImageClassification", path, attn, "float32")
        image_size = net.config.image_size
        if image_size != size:
            raise ValueError(f"{path}: the model takes {image_size}px images, size={size}")
        patch = int(net.config.patch_size)
        pre = path / "preprocessor_config.json"
        if pre.is_file() and mean is None:
            cfg = json.loads(pre.read_text())
            mean, std, source = cfg["image_mean"], cfg["image_std"], str(pre)
        call: Callable[[Tensor], Tensor] = lambda x_: net(pixel_values=x_).logits  # noqa: E731
    else:
        net = load_state_dict(torchvision_model("vit_b_16", num_classes=10), path, "vit_b_16")
        if getattr(net, "image_size", size) != size:
            raise ValueError(f"{path}: the model takes {net.image_size}px images, size={size}")
        patch = int(net.patch_size)
        call = net
    mean = IMAGENET_MEAN if mean is None else tuple(mean)
    std = IMAGENET_STD if std is None else tuple(std)
    up = F.interpolate(x32[:n], size=(size, size), mode="bilinear", align_corners=False)
    info = {
        "test_size": len(labels),
        "normalisation": {"mean": list(mean), "std": list(std), "source": source},
        "preprocessing": f"bilinear upsampling 32 -> {size}",
        "weights": str(path),
    }
    x = _normalise(up, mean, std)
    return _image_task("vit-cifar10", net, call, x, labels[:n].clone(), patch, batch_size, info)


# ---------------------------------------------------------------------------------------------
# text classification and next-token prediction


def _imdb(path: Path) -> list[tuple[str, int]]:
    """``(text, label)`` pairs (label 1 = positive) of IMDB's test split, sorted by file name."""
    layout = "aclImdb/ (with test/pos, test/neg of .txt files), or a .jsonl/.csv with text,label"
    if path.is_dir():
        root = path / "test" if (path / "test" / "pos").is_dir() else path
        if not ((root / "pos").is_dir() and (root / "neg").is_dir()):
            raise FileNotFoundError(f"data: {path} has no test/pos and test/neg; expected {layout}")
        return [
            (f.read_text(encoding="utf-8"), label)
            for label, sub in ((1, "pos"), (0, "neg"))
            for f in sorted((root / sub).glob("*.txt"))
        ]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise ValueError(f"data: {path} is neither a directory, .jsonl nor .csv; expected {layout}")
    for i, row in enumerate(rows):
        if "text" not in row or "label" not in row:
            raise KeyError(f"data: row {i} of {path} lacks 'text' or 'label' ({sorted(row)})")
    return [(str(r["text"]), int(r["label"])) for r in rows]


def _imdb_label_order(model: nn.Module) -> tuple[list[int], str]:
    """Column of the model for IMDB label 0 (negative) and 1 (positive), and how it was found."""
    names = {int(k): str(v).lower() for k, v in model.config.id2label.items()}
    neg = [k for k, v in names.items() if v.startswith("neg")]
    pos = [k for k, v in names.items() if v.startswith("pos")]
    if len(neg) == 1 and len(pos) == 1:
        return [neg[0], pos[0]], f"from id2label {model.config.id2label}"
    return [0, 1], f"assumed column 1 = positive (id2label {model.config.id2label} has no names)"


def _token_task(
    name: str,
    model: nn.Module,
    tok: Any,
    ids: Tensor,
    mask: Tensor,
    special: Tensor,
    targets: Tensor,
    labels: Tensor,
    output: str,
    replacement: str,
    info: dict[str, Any],
) -> Task:
    kw = {}
    if output == "last" and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1  # the last position only: (T, vocab) logits are large

    def forward(x: Tensor, idx: Tensor) -> Tensor:
        out = model(inputs_embeds=x, attention_mask=mask[idx].to(x.device), **kw)
        return out.logits if output == "logits" else out.logits[:, -1]

    return Task(
        name=name,
        kind="tokens",
        model=model,
        inputs=ids,
        targets=targets,
        labels=labels,
        to_x=lambda i: model.get_input_embeddings()(i),
        forward=forward,
        rankable=mask.bool() & ~special,
        replacement_id=_replacement_id(tok, replacement),
        hf={"model": model, "output": output, "attention_mask": mask},
        info={"params": _n_params(model), **info},
    )


def build_llama_imdb(
    model: str,
    data: str,
    tokenizer: str | None = None,
    n_eval: int | None = 1000,
    max_len: int = 512,
    padding_side: str = "left",
    replacement: str = "auto",
    seed: int = 0,
    attn: str = "eager",
    dtype: str = "float32",
    batch_size: int = 8,
) -> Task:
    """``llama-imdb``: ``AutoModelForSequenceClassification`` from the directory ``model``
    (tokenizer from ``tokenizer``, default the same directory) on IMDB's test reviews.

    The reviews are taken in the order of a ``seed``-ed permutation (pos and neg mixed),
    tokenized with the tokenizer's special tokens (Llama: ``<|begin_of_text|>``) and truncated
    to ``max_len`` tokens, then padded to the longest evaluated review on ``padding_side``
    (``"left"`` by default: a decoder classifier given ``inputs_embeds`` reads the last
    position; with rotary positions and the attention mask, left padding changes nothing; use
    ``"right"`` for a ``[CLS]`` encoder).  ``rankable`` = real tokens that are not special
    tokens.  ``replacement_id`` (see :func:`_replacement_id`) is the unk token, else the pad
    token, for ``replacement="auto"``.  ``targets`` = predicted class; ``labels`` = the gold
    label mapped to the model's column via ``id2label`` (``info["label_order"]``).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'")
    reviews = _imdb(_require(data, "data", "aclImdb/ or a .jsonl / .csv file"))
    n = _check_n_eval("llama-imdb", n_eval, len(reviews))
    net = _hf_model("AutoModelForSequenceClassification", model, attn, dtype)
    tok = _hf_tokenizer(tokenizer or model)
    order = torch.randperm(len(reviews), generator=torch.Generator().manual_seed(seed))[:n]
    texts = [reviews[i][0] for i in order.tolist()]
    enc = tok(texts, truncation=True, max_length=max_len)
    ids, mask = _pad(enc["input_ids"], _pad_id(tok, net), padding_side)
    columns, how = _imdb_label_order(net)
    labels = torch.tensor([columns[reviews[i][1]] for i in order.tolist()], dtype=torch.long)
    emb = net.get_input_embeddings()
    pred = _batched(
        lambda s: net(inputs_embeds=emb(ids[s]), attention_mask=mask[s]).logits.argmax(-1),
        n,
        batch_size,
    )
    lengths = mask.sum(1)
    info = {
        "accuracy": float((pred == labels).float().mean()),
        "reviews_found": len(reviews),
        "truncated": int(sum(len(tok(t)["input_ids"]) > max_len for t in texts)),
        "mean_tokens": float(lengths.float().mean()),
        "max_len": max_len,
        "label_order": how,
    }
    special = _special_mask(tok, ids)
    return _token_task(
        "llama-imdb", net, tok, ids, mask, special, pred, labels, "logits", replacement, info
    )


def build_llama_wikipedia(
    model: str,
    data: str,
    tokenizer: str | None = None,
    n_eval: int | None = 1000,
    ctx: int = 512,
    bos: bool = True,
    max_per_file: int | None = None,
    replacement: str = "auto",
    attn: str = "eager",
    dtype: str = "float32",
    batch_size: int = 4,
) -> Task:
    """``llama-wikipedia``: ``AutoModelForCausalLM`` from ``model`` predicting the next token of
    windows of local text (``data``: a ``.txt`` file or a directory searched recursively for
    ``*.txt``, in sorted order).

    Each file is tokenized without special tokens; its consecutive non-overlapping windows of
    ``w = ctx - 1`` tokens (``ctx`` if ``bos`` is false or the tokenizer has no bos token) that
    are followed by one more token become samples ``[bos] + window``, at most ``max_per_file``
    per file, until ``n_eval`` samples exist.  The explained class is the gold next token
    (``targets = labels``); ``info["accuracy"]`` is how often it is the arg-max.  Files shorter
    than ``w + 1`` tokens are skipped and counted (``info["files_too_short"]``).  The bos token
    is never ranked; there is no padding.
    """
    root = _require(data, "data", "a .txt file or a directory of .txt files")
    files = [root] if root.is_file() else sorted(root.rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"data: no .txt files under {root}; expected plain-text articles")
    net = _hf_model("AutoModelForCausalLM", model, attn, dtype)
    tok = _hf_tokenizer(tokenizer or model)
    prefix = [int(tok.bos_token_id)] if bos and tok.bos_token_id is not None else []
    width = ctx - len(prefix)
    rows: list[list[int]] = []
    gold: list[int] = []
    short = used = 0
    for f in files:
        if n_eval is not None and len(rows) >= n_eval:
            break
        text_ids = tok(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(text_ids) < width + 1:
            short += 1
            continue
        used += 1
        starts = range(0, len(text_ids) - width, width)
        for k, s in enumerate(starts):
            if (max_per_file is not None and k >= max_per_file) or len(rows) == n_eval:
                break
            rows.append(prefix + text_ids[s : s + width])
            gold.append(text_ids[s + width])
    if not rows:
        raise ValueError(f"data: no file under {root} has the {width + 1} tokens a window needs")
    n = _check_n_eval("llama-wikipedia", n_eval, len(rows))
    ids = torch.tensor(rows[:n], dtype=torch.long)
    labels = torch.tensor(gold[:n], dtype=torch.long)
    mask = torch.ones_like(ids)
    task = _token_task(
        "llama-wikipedia",
        net,
        tok,
        ids,
        mask,
        _special_mask(tok, ids),
        labels,
        labels,
        "last",
        replacement,
        {"files_found": len(files), "files_used": used, "files_too_short": short, "ctx": ctx},
    )
    pred = _batched(
        lambda s: task.forward(task.to_x(ids[s]), torch.arange(n)[s]).argmax(-1), n, batch_size
    )
    task.info["accuracy"] = float((pred == labels).float().mean())
    return task


# ---------------------------------------------------------------------------------------------
# extractive QA


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the),
    single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """SQuAD's exact match and F1 of ``prediction`` against the best of ``answers``.

    ``EM = [norm(p) == norm(a)]``; with ``P``, ``A`` the whitespace tokens of the normalised
    strings and ``c`` their multiset overlap, ``F1 = 2 c / (|P| + |A|)`` (0 if ``c = 0``).
    """
    em = f1 = 0.0
    p_tokens = normalize_answer(prediction).split()
    for a in answers:
        a_tokens = normalize_answer(a).split()
        em = max(em, float(normalize_answer(prediction) == normalize_answer(a)))
        common = sum((collections.Counter(p_tokens) & collections.Counter(a_tokens)).values())
        if common:
            f1 = max(f1, 2.0 * common / (len(p_tokens) + len(a_tokens)))
    return em, f1


def _squad(path: Path) -> list[dict[str, Any]]:
    """The answerable questions of a SQuAD (v2) json file, in file order."""
    layout = "SQuAD v2's dev-v2.0.json ({'data': [{'paragraphs': [{'context', 'qas'}]}]})"
    if path.is_dir() or path.suffix != ".json":
        raise ValueError(f"data: {path} is not a .json file; expected {layout}")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if "data" not in doc:
        raise KeyError(f"data: {path} has no 'data' key; expected {layout}")
    out = []
    for article in doc["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("is_impossible", False) or not qa["answers"]:
                    continue
                out.append(
                    {
                        "id": qa["id"],
                        "question": qa["question"],
                        "context": para["context"],
                        "answers": qa["answers"],
                    }
                )
    if not out:
        raise ValueError(f"data: {path} has no answerable question")
    return out


def _char_to_tokens(
    offsets: Sequence[tuple[int, int]], in_context: Sequence[bool], start: int, end: int
) -> tuple[int, int] | None:
    """Inclusive token span of the characters ``[start, end)`` of the context: the first
    context token ending after ``start`` and the last one starting before ``end``."""
    toks = [i for i, (a, b) in enumerate(offsets) if in_context[i] and b > start and a < end]
    return (toks[0], toks[-1]) if toks else None


def _qa_logits(model: nn.Module, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(start_logits, end_logits)`` on input embeddings ``x``; for an encoder-decoder (T5) the
    decoder reads ``x`` shifted right with ``decoder_start_token_id``'s embedding first, what
    ``T5ForQuestionAnswering`` does with ``input_ids``."""
    kw: dict[str, Any] = {}
    if model.config.is_encoder_decoder:
        start = model.get_input_embeddings().weight[model.config.decoder_start_token_id]
        kw["decoder_inputs_embeds"] = torch.cat(
            [start.expand(x.shape[0], 1, -1).to(x.dtype), x[:, :-1]], 1
        )
    out = model(inputs_embeds=x, attention_mask=mask, **kw)
    return out.start_logits, out.end_logits


def predict_span(start: Tensor, end: Tensor, context: Tensor) -> tuple[int, int] | None:
    """``s = argmax start`` over all positions; ``None`` (no answer / invalid) unless ``s`` is a
    context token; else ``(s, argmax_{e >= s, e in context} end)``."""
    s = int(start.argmax())
    if not bool(context[s]):
        return None
    allowed = context.clone()
    allowed[:s] = False
    e = int(end.masked_fill(~allowed, float("-inf")).argmax())
    return s, e


def _encode_squad(tok: Any, q: dict[str, Any]) -> dict[str, Any]:
    """``tok(question.lstrip(), context)`` with the offsets, the context / question token masks
    and the gold token span of the first answer (``None`` if no context token covers it)."""
    enc = tok(q["question"].lstrip(), q["context"], return_offsets_mapping=True)
    seq = enc.sequence_ids()
    in_context = [sid == 1 for sid in seq]
    a = q["answers"][0]
    chars = (a["answer_start"], a["answer_start"] + len(a["text"]))
    return {
        **q,
        "ids": enc["input_ids"],
        "offsets": enc["offset_mapping"],
        "in_context": in_context,
        "question_mask": [sid == 0 for sid in seq],
        "gold": _char_to_tokens(enc["offset_mapping"], in_context, *chars),
    }


def _predict_squad(
    model: nn.Module, batch: list[dict[str, Any]], pad_id: int
) -> list[dict[str, Any]]:
    """Each encoded question with its predicted span ``"pred"`` (:func:`predict_span`, ``None``
    when invalid), the span's text and its SQuAD ``"em"``, ``"f1"`` (0 when invalid)."""
    ids, mask = _pad([b["ids"] for b in batch], pad_id, "right")
    with torch.no_grad():
        s_log, e_log = _qa_logits(model, model.get_input_embeddings()(ids), mask)
    out = []
    for i, b in enumerate(batch):
        context = torch.zeros(ids.shape[1], dtype=torch.bool)
        context[: len(b["ids"])] = torch.tensor(b["in_context"])
        span = predict_span(s_log[i], e_log[i], context)
        text = (
            ""
            if span is None
            else b["context"][b["offsets"][span[0]][0] : b["offsets"][span[1]][1]]
        )
        em, f1 = squad_scores(text, [a["text"] for a in b["answers"]])
        out.append({**b, "pred": span, "text": text, "em": em, "f1": f1})
    return out


def build_squad_qa(
    model: str,
    data: str,
    tokenizer: str | None = None,
    n_eval: int | None = None,
    max_len: int = 512,
    replacement: str = "auto",
    attn: str = "eager",
    dtype: str = "float32",
    batch_size: int = 8,
) -> Task:
    """``squad-qa``: ``AutoModelForQuestionAnswering`` from ``model`` (RoBERTa, BERT, T5 ...) on
    the answerable questions of SQuAD v2 ``data`` (``dev-v2.0.json``), in file order.

    Input = ``tokenizer(question.lstrip(), context)`` with its special tokens, never truncated:
    a pair longer than ``max_len`` tokens is skipped and counted (``info["skipped_too_long"]``,
    as the paper did).  Gold span = the inclusive token span of the first answer's characters
    (offset mapping); predicted span = :func:`predict_span` (the start must be a context token,
    else the model answers "no answer" and the sample is skipped and counted in
    ``info["skipped_invalid_span"]``).  Questions are processed until ``n_eval`` samples are
    kept.  ``info``: SQuAD's exact match and F1 (:func:`squad_scores`, text of the predicted
    span against every gold answer, in percent) over all processed questions that fit (a
    skipped invalid prediction scores 0) and over the kept ones.  The task is right padded;
    ``question`` marks the question's tokens; ``rankable`` = context tokens that are not
    special tokens; output ``"span"`` (``start_logits[s] + end_logits[e]``, target 0,
    ``score="logit"``).
    """
    questions = _squad(_require(data, "data", "SQuAD v2's dev-v2.0.json"))
    net = _hf_model("AutoModelForQuestionAnswering", model, attn, dtype)
    tok = _hf_tokenizer(tokenizer or model, fast=True)
    pad_id = _pad_id(tok, net)
    emb = net.get_input_embeddings()
    counts = {"processed": 0, "too_long": 0, "unmappable": 0, "invalid": 0}
    kept: list[dict[str, Any]] = []
    scores: list[tuple[float, float]] = []  # (EM, F1) of every processed question that fits
    pending: list[dict[str, Any]] = []
    for q in questions:
        if n_eval is not None and len(kept) >= n_eval:
            break
        counts["processed"] += 1
        enc = _encode_squad(tok, q)
        if len(enc["ids"]) > max_len:
            counts["too_long"] += 1
        elif enc["gold"] is None:
            counts["unmappable"] += 1
        else:
            pending.append(enc)
        full = n_eval is not None and len(kept) + len(pending) >= n_eval
        if pending and (len(pending) == batch_size or full or q is questions[-1]):
            for enc in _predict_squad(net, pending, pad_id):
                scores.append((enc["em"], enc["f1"]))
                if enc["pred"] is None:
                    counts["invalid"] += 1
                else:
                    kept.append(enc)
            pending = []
    if not kept or (n_eval is not None and len(kept) < n_eval):
        raise ValueError(
            f"squad-qa: {len(kept)} questions of {data} kept, n_eval={n_eval}: {counts}"
        )
    ids, mask = _pad([k["ids"] for k in kept], pad_id, "right")
    question = torch.zeros_like(ids, dtype=torch.bool)
    for i, k in enumerate(kept):
        question[i, : len(k["ids"])] = torch.tensor(k["question_mask"])
    spans = torch.tensor([k["gold"] for k in kept], dtype=torch.long)
    pred = torch.tensor([k["pred"] for k in kept], dtype=torch.long)

    def forward(x: Tensor, idx: Tensor) -> Tensor:
        s_l, e_l = _qa_logits(net, x, mask[idx].to(x.device))
        p = pred[idx].to(x.device)
        return s_l.gather(1, p[:, :1]) + e_l.gather(1, p[:, 1:])

    em_all, f1_all = (100.0 * sum(v) / len(scores) for v in zip(*scores, strict=True))
    info = {
        "exact_match": em_all,
        "f1": f1_all,
        "exact_match_kept": 100.0 * sum(k["em"] for k in kept) / len(kept),
        "f1_kept": 100.0 * sum(k["f1"] for k in kept) / len(kept),
        "metric": "SQuAD EM/F1 (normalised answer text, best gold answer), percent",
        "answerable_in_file": len(questions),
        "processed": counts["processed"],
        "kept": len(kept),
        "skipped_too_long": counts["too_long"],
        "skipped_invalid_span": counts["invalid"],
        "skipped_gold_unmappable": counts["unmappable"],
        "max_len": max_len,
        "params": _n_params(net),
    }
    zeros = torch.zeros(len(kept), dtype=torch.long)
    hf = {"model": net, "output": "span", "attention_mask": mask, "spans": pred}
    if net.config.is_encoder_decoder:
        hf["decoder_inputs"] = "shift_right(inputs_embeds)"
    return Task(
        name="squad-qa",
        kind="tokens",
        model=net,
        inputs=ids,
        targets=zeros,
        labels=zeros,
        to_x=lambda i: emb(i),
        forward=forward,
        score="logit",
        rankable=mask.bool() & ~_special_mask(tok, ids) & ~question,
        replacement_id=_replacement_id(tok, replacement),
        spans=spans,
        predicted_spans=pred,
        question=question,
        hf=hf,
        info=info,
    )


# ---------------------------------------------------------------------------------------------
# registry and command-line specs


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
