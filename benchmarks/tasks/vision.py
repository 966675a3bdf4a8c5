"""Image tasks of the faithfulness benchmark: small models trained here, on the CPU.

``VISION_TASKS[name](quick=..., n_eval=...)`` returns a ready :class:`~dynamiclrp.evaluation.task.Task`:

- ``digits-vgg``: a VGG-style CNN (three conv-relu-conv-relu-maxpool blocks, no batch norm, a
  two-layer head) on scikit-learn's digits upsampled to 32x32; pixel flipping unit 1 pixel.
- ``shapes-resnet``: a small ResNet (stem and three BasicBlocks with batch norm) on
  :func:`~dynamiclrp.evaluation.synthetic_images.make_shapes`; perturbation unit 1 pixel (the
  target objects are 5 to 13 pixels wide, so 4x4 patches would be as big as a quarter of them).
- ``shapes-vit``: a small ViT (4x4 patches, 3 pre-norm blocks, width 64, mean pooling) on the
  same data; perturbation unit = its patch size, 4.

The evaluation samples are the first ``n_eval`` test samples; ``targets`` are the model's
predicted classes on them.  ``evidence`` is the target object's mask for the shapes tasks (none
for digits).  ``info`` holds the test accuracy (on the whole test set), the parameter count,
the training time and statistics.  Models are cached by :func:`benchmarks.tasks.common.cached`,
keyed by everything in their config; ``quick=True`` trains smaller, faster models under their
own keys.  The caller sets ``torch.set_num_threads``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dynamiclrp.demo_models import EncoderBlock as Block  # pre-norm block, attention written out
from dynamiclrp.evaluation.synthetic_images import SHAPES, load_digits_32, make_shapes
from dynamiclrp.evaluation.task import Task

from .common import accuracy, cached, cached_stats, n_params, train_classifier

# ---------------------------------------------------------------------------------------------
# models


class SmallVGG(nn.Module):
    """VGG-style CNN for ``(1, 32, 32)`` inputs: blocks of conv3x3-ReLU-conv3x3-ReLU-maxpool2
    with ``widths`` channels, then Flatten-Linear-ReLU-Linear."""

    def __init__(
        self, widths: tuple[int, ...] = (16, 32, 64), hidden: int = 128, classes: int = 10
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.ReLU()]
            layers += [nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = w
        self.features = nn.Sequential(*layers)
        side = 32 // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, the
    shortcut a strided 1x1 conv with batch norm where the shape changes, else the identity."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class SmallResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, one :class:`BasicBlock` per width (stride 2 from the second on),
    global average pooling, a linear head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        blocks = [BasicBlock(widths[0], widths[0])]
        blocks += [BasicBlock(a, b, stride=2) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SmallViT(nn.Module):
    """ViT: a ``patch x patch`` strided-conv patch embedding plus learned position embeddings,
    ``depth`` :class:`Block`\\ s, a final LayerNorm, mean pooling over tokens, a linear head."""

    def __init__(
        self,
        size: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
        mlp: int = 128,
        classes: int = 4,
    ):
        super().__init__()
        if size % patch:
            raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(1))


# ---------------------------------------------------------------------------------------------
# tasks


def _predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(x[b : b + batch_size]).argmax(-1) for b in range(0, len(x), batch_size)]
        )


def _task(
    name: str,
    model: nn.Module,
    config: dict[str, Any],
    x_test: Tensor,
    y_test: Tensor,
    n_eval: int,
    patch: int,
    evidence: Tensor | None,
    replacement: str | None = None,
) -> Task:
    if not 1 <= n_eval <= len(y_test):
        raise ValueError(f"{name}: n_eval={n_eval} must be in [1, {len(y_test)}] (the test set)")
    stats = cached_stats(name, config)
    inputs = x_test[:n_eval].contiguous()
    return Task(
        name=name,
        kind="image",
        model=model.eval(),
        inputs=inputs,
        targets=_predict(model, inputs),
        labels=y_test[:n_eval].clone(),
        to_x=lambda t: t,
        forward=lambda x, idx: model(x),
        evidence=None if evidence is None else evidence[:n_eval].clone(),
        patch=patch,
        replacement=replacement,
        info={
            "accuracy": accuracy(model, x_test, y_test),
            "test_size": len(y_test),
            "params": n_params(model),
            "train_seconds": stats["seconds"],
            "train": stats,
            "config": config,
        },
    )


def build_digits_vgg(quick: bool = False, n_eval: int = 256) -> Task:
    """``digits-vgg``: :class:`SmallVGG` on 32x32 digits (1348 train, 449 test), patch 1."""
    config = {
        "seed": 0,
        "split_seed": 0,
        "widths": [16, 32, 64],
        "hidden": 128,
        "epochs": 6 if quick else 25,
        "lr": 1e-3,
        "batch_size": 32,
    }
    x_tr, y_tr, x_te, y_te = load_digits_32(seed=config["split_seed"])

    def build() -> nn.Module:
        return SmallVGG(tuple(config["widths"]), config["hidden"], 10)

    def train(model: nn.Module) -> dict[str, Any]:
        return train_classifier(
            model,
            (x_tr, y_tr),
            epochs=config["epochs"],
            lr=config["lr"],
            batch_size=config["batch_size"],
            seed=config["seed"],
            cosine=True,
        )

    model = cached("digits-vgg", config, build, train)
    # The paper's blur, scaled to 32 px (sigma ~3 px), leaves an upsampled 8x8 digit readable, so
    # the curves hardly move (ABPC ~0.05 for every method): replace by the image's mean instead.
    return _task(
        "digits-vgg", model, config, x_te, y_te, n_eval, patch=1, evidence=None, replacement="mean"
    )


TEST_CHUNK = 500
"""The shapes test set is drawn in chunks of this many images, chunk ``k`` with the seed
``test_seed + 10_000 k``, so a larger test set extends a smaller one (same first rows)."""


def _shapes_data(
    config: dict[str, Any], n_test: int
) -> tuple[Callable[[int], tuple[Tensor, Tensor]], tuple[Tensor, Tensor, Tensor]]:
    """Training data (fresh images each epoch, seeds ``train_seed + epoch``) and ``n_test``
    test images (see :data:`TEST_CHUNK`)."""
    kwargs = {
        "size": config["size"],
        "n_distractors": config["n_distractors"],
        "classes": tuple(config["classes"]),
    }

    def make_batch(epoch: int) -> tuple[Tensor, Tensor]:
        x, y, _ = make_shapes(config["n_train"], seed=config["train_seed"] + epoch, **kwargs)
        return x, y

    chunks = [
        make_shapes(TEST_CHUNK, seed=config["test_seed"] + 10_000 * k, **kwargs)
        for k in range(math.ceil(n_test / TEST_CHUNK))
    ]
    test = tuple(torch.cat(parts)[:n_test] for parts in zip(*chunks, strict=True))
    return make_batch, test


def _shapes_config(quick: bool, **extra: Any) -> dict[str, Any]:
    # Training seeds are train_seed + epoch (1000, 1001, ...); test seeds 7, 10007, 20007, ...
    return {
        "seed": 0,
        "size": 32,
        "n_distractors": 3,
        "classes": list(SHAPES),
        "train_seed": 1000,
        "test_seed": 7,
        "n_train": 4000 if quick else 10000,
        **extra,
    }


def _shapes_task(
    name: str,
    quick: bool,
    n_eval: int,
    config: dict[str, Any],
    build: Callable[[], nn.Module],
    patch: int,
) -> Task:
    n_test = max(n_eval, 500 if quick else 2000)
    make_batch, (x_te, y_te, m_te) = _shapes_data(config, n_test)

    def train(model: nn.Module) -> dict[str, Any]:
        return train_classifier(
            model,
            make_batch,
            epochs=config["epochs"],
            lr=config["lr"],
            batch_size=config["batch_size"],
            seed=config["seed"],
            weight_decay=config["weight_decay"],
            cosine=True,
            warmup=config["warmup"],
            clip=1.0,
        )

    model = cached(name, config, build, train)
    return _task(name, model, config, x_te, y_te, n_eval, patch=patch, evidence=m_te)


def build_shapes_resnet(quick: bool = False, n_eval: int = 256) -> Task:
    """``shapes-resnet``: :class:`SmallResNet` on :func:`make_shapes` images, patch 1."""
    config = _shapes_config(
        quick,
        model="resnet",
        widths=[16, 32, 64],
        epochs=4 if quick else 6,
        lr=3e-3,
        batch_size=64,
        weight_decay=0.0,
        warmup=0,
    )

    def build() -> nn.Module:
        return SmallResNet(tuple(config["widths"]), len(SHAPES))

    return _shapes_task("shapes-resnet", quick, n_eval, config, build, patch=1)


def build_shapes_vit(quick: bool = False, n_eval: int = 256) -> Task:
    """``shapes-vit``: :class:`SmallViT` (patch 4) on :func:`make_shapes` images, patch 4."""
    config = _shapes_config(
        quick,
        model="vit",
        patch=4,
        dim=64,
        depth=3,
        heads=4,
        mlp=128,
        epochs=6 if quick else 12,
        lr=2e-3,
        batch_size=64,
        weight_decay=0.05,
        warmup=100,
    )

    def build() -> nn.Module:
        c = config
        return SmallViT(c["size"], c["patch"], c["dim"], c["depth"], c["heads"], c["mlp"], 4)

    return _shapes_task("shapes-vit", quick, n_eval, config, build, patch=config["patch"])


VISION_TASKS: dict[str, Callable[..., Task]] = {
    "digits-vgg": build_digits_vgg,
    "shapes-resnet": build_shapes_resnet,
    "shapes-vit": build_shapes_vit,
}
"""``name -> build(quick: bool, n_eval: int) -> Task``."""
