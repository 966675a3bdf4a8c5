"""The image setups of :mod:`.real`: VGG16 on ImageNette and ViT-B/16 on CIFAR-10.

See :mod:`.real` for the setups and the spec syntax; import through it (``from tasks import
real``).  The model architectures come from ``real_common.torchvision_model``, looked up when a builder
runs (tests replace it there by a tiny model).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamiclrp.evaluation.task import Task

if f"{__package__}.real" not in sys.modules:  # real defines the helpers, then imports this
    raise ImportError(
        f"import {__package__}.real (it loads {__name__}) before {__name__}: {__name__} takes "
        f"its helpers from {__package__}.real, which imports {__name__} after defining them"
    )

from . import real_common
from .real_common import _check_n_eval, _hf_model, _image_task, _require

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
    net = load_state_dict(real_common.torchvision_model(arch), model, arch)
    info = {
        "images_found": len(items),
        "preprocessing": f"resize {resize} (shorter side), centre crop {crop}, ImageNet mean/std",
        "weights": str(model),
        "accuracy_over": "1000 ImageNet classes",
    }
    return _image_task("vgg16-imagenette", net, net, x, labels, 1, batch_size, info)


def _cifar_test(path: Path) -> tuple[Tensor, Tensor]:
    """CIFAR-10's test set in its *binary* version (``cifar-10-batches-bin/test_batch.bin``:
    10,000 records of one label byte and 3,072 pixel bytes, channels first).  The python
    version is a pickle, which this project never unpickles (a pickle can run code)."""
    layout = (
        "CIFAR-10's binary version: the directory cifar-10-batches-bin/ holding test_batch.bin "
        "(or that file); the python version (a pickle) is not read, convert or download the "
        "binary one (https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz)"
    )
    f = path / "test_batch.bin" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"data: {f} does not exist; expected {layout}")
    raw = np.fromfile(f, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise ValueError(f"data: {f} is not a CIFAR-10 binary batch ({raw.size} bytes); {layout}")
    records = torch.from_numpy(raw.reshape(-1, 3073))
    pixels = records[:, 1:].reshape(-1, 3, 32, 32)
    return pixels.float() / 255.0, records[:, 0].long()


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
        net = load_state_dict(
            real_common.torchvision_model("vit_b_16", num_classes=10), path, "vit_b_16"
        )
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
