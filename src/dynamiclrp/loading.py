"""Loading what the command line names: user code (``module:callable``), weights (safetensors or
``torch.load(..., weights_only=True)``, never a pickle), image classifiers (``shipped:``, ``tv:``,
a weights file with an architecture) and images (PNG / JPEG through Pillow, or ``.npy`` without
pickles), with the preprocessing flags of ``dynamiclrp explain-image``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import DynamicLRPError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class CLIError(DynamicLRPError):
    """A command-line input is wrong (missing file, bad spec, unsupported model file)."""


# -- loading user code and weights ---------------------------------------------------------------


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The working directory on ``sys.path`` for one import (removed again afterwards)."""
    sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(os.getcwd())


def _import_callable(spec: str, what: str = "MODULE:CALLABLE") -> Callable[..., Any]:
    """The object ``module:attr.attr`` names (modules are found from the working directory)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise CLIError(f"expected {what} (e.g. mypackage.models:build), got {spec!r}")
    try:
        with _cwd_on_path():
            obj: Any = importlib.import_module(module)
    except ImportError as err:
        raise CLIError(f"cannot import module {module!r} of {spec!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {module!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _load(spec: str) -> Callable[[], Any]:
    """The ``coverage`` callable: ``zoo:NAME`` or ``MODULE:CALLABLE``."""
    if spec.startswith("zoo:"):
        from . import zoo

        return lambda: zoo.run(spec[4:])
    return _import_callable(spec, "MODULE:CALLABLE or zoo:NAME")


def _weights_file(path: Path) -> Path:
    """The one weights file of ``path`` (itself, or the single such file in a folder)."""
    if not path.exists():
        raise CLIError(f"weights file or folder {str(path)!r} does not exist")
    if path.is_file():
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(found) != 1:
        raise CLIError(
            f"folder {str(path)!r} holds {len(found)} weight files ({', '.join(WEIGHT_SUFFIXES)})"
            f"{': ' + ', '.join(p.name for p in found) if found else ''}; pass the file itself"
        )
    return found[0]


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file of tensors.

    ``torch.save`` files are read with ``weights_only=True``: a file holding pickled Python
    objects (a whole ``nn.Module``) is refused, never unpickled.  A checkpoint dict whose
    ``"state_dict"`` or ``"model"`` entry is the state dict is accepted.
    """
    file = _weights_file(Path(path))
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise CLIError(
                f"reading {file.name} needs safetensors: pip install safetensors"
            ) from err
        return load_file(str(file), device="cpu")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CLIError(
            f"{str(file)!r} holds pickled Python objects that torch.load(weights_only=True) "
            "refuses to load (unpickling can run arbitrary code); where you trust the file, "
            "convert it to a state dict (torch.save(model.state_dict(), 'weights.pt')) or to "
            "safetensors (safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))"
        ) from err
    except RuntimeError as err:
        raise CLIError(f"cannot read {str(file)!r} with torch.load: {err}") from err
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and all(isinstance(v, Tensor) for v in inner.values()):
                return inner
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CLIError(
            f"{str(file)!r} holds a {type(obj).__name__}, not a state dict (a dict of tensors)"
        )
    return obj


def _as_module(obj: Any, spec: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise CLIError(f"{spec!r} returned a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def load_image_model(
    spec: str, *, arch: str | None, weights: str | None, allow_download: bool = False
) -> nn.Module:
    """The model ``spec`` names, with ``weights`` loaded if given, in eval mode.

    ``spec``: ``shipped:digits``; ``tv:NAME`` (torchvision, ``--weights`` or
    ``allow_download``); ``module:callable`` returning an ``nn.Module``; or a weights file /
    folder, with ``arch`` the ``module:callable`` that builds the architecture.
    """
    if spec == "shipped:digits":
        from .demo_models import load_digits_model

        model: nn.Module = load_digits_model()[0]
    elif spec.startswith("shipped:"):
        raise CLIError(f"unknown shipped image model {spec!r}; the shipped one is shipped:digits")
    elif spec.startswith("tv:"):
        try:
            import torchvision
        except ImportError as err:
            raise CLIError(f"{spec} needs torchvision: pip install torchvision") from err
        name = spec[3:]
        if weights is None and not allow_download:
            raise CLIError(
                f"{spec} needs its weights: --weights FILE (a state dict), or --allow-download "
                "for torchvision's default weights (a network call)"
            )
        try:
            tv_weights = "DEFAULT" if weights is None else None
            model = torchvision.models.get_model(name, weights=tv_weights)
        except ValueError as err:
            raise CLIError(f"torchvision has no model {name!r}: {err}") from err
    elif Path(spec).exists():
        if arch is None:
            raise CLIError(
                f"{spec!r} is a weights file or folder; say which architecture it is for with "
                "--arch MODULE:CALLABLE (a function returning the nn.Module)"
            )
        if weights is not None:
            raise CLIError("give the weights either as MODEL or as --weights, not both")
        model, weights = _as_module(_import_callable(arch)(), arch), spec
    elif ":" in spec and not spec.startswith(("/", ".")):
        model = _as_module(_import_callable(spec)(), spec)
    else:
        raise CLIError(
            f"model {spec!r} not found: expected a weights file or folder (with --arch), "
            "MODULE:CALLABLE, tv:NAME or shipped:digits"
        )
    if weights is not None:
        state = load_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise CLIError(
                f"the weights in {weights!r} do not fit the model: {' '.join(first[:3])}"
            ) from err
    return model.eval()


# -- images ---------------------------------------------------------------------------------------


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as err:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from err


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError as err:
        raise CLIError(f"--size must be N or HxW, got {text!r}") from err
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise CLIError(f"--size must be N or HxW with positive sizes, got {text!r}")
    return (dims[0], dims[-1])


def read_image(path: str, channels: int, scale: float | None) -> Tensor:
    """``(C, H, W)`` float32 of an image file (Pillow) or a ``.npy`` array.

    Values are multiplied by ``scale``: default ``1/255`` for image files and integer arrays,
    ``1`` for float arrays.  A ``.npy`` array may be ``(H, W)`` (one channel), ``(C, H, W)`` or
    ``(H, W, C)`` with ``C = channels`` (read as ``(C, H, W)`` where both fit).
    """
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"image file {path!r} does not exist")
    if file.suffix.lower() == ".npy":
        try:
            arr = np.load(file, allow_pickle=False)
        except ValueError as err:
            raise CLIError(f"cannot read {path!r} as a numeric .npy array: {err}") from err
        shape = arr.shape
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[0] != channels and arr.shape[-1] == channels:
            arr = np.moveaxis(arr, -1, 0)  # (H, W, C); (C, H, W) wins where both fit
        if arr.ndim != 3 or arr.shape[0] != channels:
            raise CLIError(
                f"{path!r} has shape {shape}; the model takes {channels} channels "
                "(--channels): expected (H, W), (C, H, W) or (H, W, C)"
            )
        default = 1 / 255 if np.issubdtype(arr.dtype, np.integer) else 1.0
    else:
        try:
            from PIL import Image
        except ImportError as err:
            raise CLIError(
                f"reading {file.suffix or 'image'} files needs Pillow (pip install pillow); "
                "or save the image as a .npy array"
            ) from err
        try:
            with Image.open(file) as img:
                arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
        except OSError as err:
            raise CLIError(f"cannot read image {path!r}: {err}") from err
        arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
        if channels not in (1, 3):
            raise CLIError(f"image files give 1 or 3 channels, not {channels}; use a .npy array")
        default = 1 / 255
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return x * float(default if scale is None else scale)


def preprocess(
    image: Tensor,
    size: tuple[int, int] | None,
    mean: list[float] | None,
    std: list[float] | None,
) -> tuple[Tensor, Tensor]:
    """``(shown (C, H, W) in the read scale, model input (1, C, H, W))``: resized bilinearly to
    ``size`` (antialiased), then ``(x - mean) / std`` per channel."""
    x = image[None]
    if size is not None and tuple(x.shape[-2:]) != size:
        x = torch.nn.functional.interpolate(
            x, size=size, mode="bilinear", align_corners=False, antialias=True
        )
    shown = x[0].clone()
    c = x.shape[1]
    for values, what in ((mean, "--mean"), (std, "--std")):
        if values is not None and len(values) not in (1, c):
            raise CLIError(f"{what} has {len(values)} values for an image of {c} channels")
    if mean is not None:
        x = x - torch.tensor(mean).view(1, -1, 1, 1)
    if std is not None:
        if min(std) <= 0:
            raise CLIError(f"--std values must be positive, got {std}")
        x = x / torch.tensor(std).view(1, -1, 1, 1)
    return shown, x.contiguous()


def _display(image: Tensor) -> np.ndarray:
    """An image in the read scale as ``(H, W, 3)`` uint8 (values outside [0, 1] min-max scaled)."""
    img = image.detach().double()
    if img.min() < 0 or img.max() > 1:
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    rgb = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    return (rgb.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
