"""Zoo entries built with torchvision and plain ``torch.nn`` (random weights).

The torchvision entries keep each architecture's op types (and so its rules) but are sized down
where the constructor allows it, so that one entry explains in well under ten seconds on a CPU:
small images, fewer layers or channels where noted.  Zero-initialised classifier heads (ViT) are
re-initialised so that the logits, and the explained relevance, are not zero.  The ``torch``
entries need nothing but PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .zoo import ZooEntry, register

CLASSES = 10


def _image(size: int, channels: int = 3):
    def inputs(model: nn.Module, batch: int, g: torch.Generator) -> dict:
        return {"x": torch.randn(batch, channels, size, size, generator=g)}

    return inputs


def _sequence(length: int, features: int):
    def inputs(model: nn.Module, batch: int, g: torch.Generator) -> dict:
        return {"x": torch.randn(batch, length, features, generator=g)}

    return inputs


def _logits(out) -> Tensor:
    return out


def _reinit(linear: nn.Linear) -> None:
    """Default ``nn.Linear`` initialisation, for heads a constructor set to zero."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(linear.in_features)
    nn.init.uniform_(linear.bias, -bound, bound)


def _calibrate(model: nn.Module, size: int, batch: int = 8) -> nn.Module:
    """Scale every batch norm by the second moment of its input on one random batch.

    With random weights and the default running statistics (mean 0, variance 1), eval-mode batch
    norm is the identity and the activations of deep networks without residuals around every
    layer shrink layer by layer (MobileNetV2's logits are ~1e-10 at 32x32 pixels), so that all
    relevance ends in the stabiliser.  One training-mode pass with a cumulative average
    (``momentum=None``) measures each input; the running variance becomes the second moment
    ``var + mean^2`` and the running mean 0, so batch norm rescales without shifting.  (With the
    shift, the eval-mode batch-norm rule gives large, cancelling shares to the input and the
    shift, up to 1e6 times the seeded relevance in EfficientNetV2, and a batch no longer matches
    its rows to 1e-7.)  The zoo then casts the model and sets eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        m.running_var += m.running_mean**2  # the second moment: scale only, no shift
        m.running_mean.zero_()
    return model


def _tv(name: str, calibrate: int = 0, **kwargs):
    """``torchvision.models.<name>(weights=None, num_classes=CLASSES, **kwargs)``, batch norm
    calibrated at ``calibrate`` pixels if given."""

    def make():
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=CLASSES, **kwargs)
        return _calibrate(model, calibrate) if calibrate else model

    return make


def _vision(name: str, build, size: int, note: str) -> None:
    register(ZooEntry(name, "torchvision", build, _image(size), "x", _logits, note))


# --- torchvision ---------------------------------------------------------------------------------


def _vgg16():
    """VGG16's 13 convolutions and 5 max-pools at full width; the classifier keeps its three
    layers (and the 7x7 adaptive average pool before it) with 256 hidden units, not 4096."""
    import torchvision

    model = torchvision.models.vgg16(weights=None, num_classes=CLASSES)
    model.classifier[0] = nn.Linear(512 * 7 * 7, 256)
    model.classifier[3] = nn.Linear(256, 256)
    model.classifier[6] = nn.Linear(256, CLASSES)
    return model


def _vit_b_16():
    """ViT-B/16's structure (patch convolution, class token, position embedding, pre-norm encoder
    blocks with ``nn.MultiheadAttention``) at 32x32 pixels, patch 8, 2 layers, width 32."""
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=CLASSES,
    )
    _reinit(model.heads.head)  # torchvision initialises the head to zero
    return model


def _efficientnet_v2_m():
    """EfficientNetV2-M's seven stages (three fused-MBConv, four MBConv with squeeze-excitation)
    at full width, two blocks per stage instead of 3-18 (the second one with its residual)."""
    from functools import partial

    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    stages = [  # torchvision's efficientnet_v2_m settings, num_layers capped at 2
        FusedMBConvConfig(1, 3, 1, 24, 24, 2),
        FusedMBConvConfig(4, 3, 2, 24, 48, 2),
        FusedMBConvConfig(4, 3, 2, 48, 80, 2),
        MBConvConfig(4, 3, 2, 80, 160, 2),
        MBConvConfig(6, 3, 1, 160, 176, 2),
        MBConvConfig(6, 3, 2, 176, 304, 2),
        MBConvConfig(6, 3, 1, 304, 512, 2),
    ]
    model = EfficientNet(
        stages,
        dropout=0.3,
        num_classes=CLASSES,
        norm_layer=partial(nn.BatchNorm2d, eps=1e-3),
        last_channel=1280,
    )
    return _calibrate(model, 32)


def _swin_t():
    """Swin-T's widths, heads and 7x7 (shifted) windows, two blocks per stage (not 2, 2, 6, 2)."""
    import torchvision

    return torchvision.models.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=96,
        depths=[2, 2, 2, 2],
        num_heads=[3, 6, 12, 24],
        window_size=[7, 7],
        stochastic_depth_prob=0.2,
        num_classes=CLASSES,
    )


_vision("vgg16", _vgg16, 32, "VGG16 (classifier 256 wide), 32x32 pixels")
_vision("resnet50", _tv("resnet50"), 32, "ResNet-50, 32x32 pixels")
_vision("vit_b_16", _vit_b_16, 32, "ViT-B/16 structure, 2 layers of width 32, patch 8, 32x32")
_vision(
    "efficientnet_v2_m",
    _efficientnet_v2_m,
    32,
    "EfficientNetV2-M stages at full width, 2 blocks each, 32x32 pixels, batch norm calibrated",
)
_vision(
    "mobilenet_v2",
    _tv("mobilenet_v2", calibrate=32),
    32,
    "MobileNetV2, 32x32 pixels, batch norm calibrated on one random batch",
)
_vision("densenet121", _tv("densenet121"), 32, "DenseNet-121, 32x32 pixels")
_vision("swin_t", _swin_t, 32, "Swin-T widths, 2 blocks per stage, 32x32 (windows padded)")
_vision("convnext_tiny", _tv("convnext_tiny"), 32, "ConvNeXt-T, 32x32 pixels")


# --- plain torch.nn ------------------------------------------------------------------------------


class RecurrentClassifier(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` (batch first) -> last hidden state -> ``nn.Linear``.

    ``x`` is handed to the layer stored sequence-first (same values and shape, a transposed
    memory layout).  The layer transposes a batch-first input to ``(T, B, F)``; in float64 on the
    CPU (no fused kernel) it then computes the input projection as one ``addmm`` when that view
    is contiguous, but as ``mm`` + ``add`` when it is not, which a batch of more than one row is
    not.  The two are explained differently (epsilon with the bias in ``z`` versus the add rule's
    proportional split), so without this a batch would not be explained as its rows.
    """

    def __init__(self, cell: type[nn.Module], features: int = 4, hidden: int = 8, layers: int = 1):
        super().__init__()
        self.rnn = cell(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, F), stored (T, B, F)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, batch first) -> mean over positions -> linear."""

    def __init__(self, d_model: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


class AttentionBlock(nn.Module):
    """``x + MultiheadAttention(x, x, x)`` (attention weights returned, so PyTorch takes the
    explicit softmax path), layer norm, feed-forward, mean over positions, linear."""

    def __init__(self, d_model: int = 16, heads: int = 2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 32), nn.GELU(), nn.Linear(32, d_model))
        self.head = nn.Linear(d_model, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.attn(x, x, x, need_weights=True)
        h = self.norm(x + a)
        h = h + self.ff(h)
        return self.head(h.mean(1))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(),
    )


class TinyUNet(nn.Module):
    """A two-level U-Net: convolutions, max-pool down, ``ConvTranspose2d``, bilinear and nearest
    ``F.interpolate`` up, skip connections by ``torch.cat``; classifies by global average pooling
    of the decoder's output map."""

    def __init__(self, channels: int = 3, width: int = 8):
        super().__init__()
        self.enc1 = _block(channels, width)
        self.enc2 = _block(width, 2 * width)
        self.mid = _block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, 2 * width)
        self.dec1 = _block(2 * width + width, width)
        self.out = nn.Conv2d(width + width, CLASSES, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)  # (w, H, W)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (2w, H/2, W/2)
        m = self.mid(F.max_pool2d(e2, 2))  # (4w, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))  # transposed convolution up
        up = F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up, e1], 1))
        nearest = F.interpolate(F.avg_pool2d(d1, 2), scale_factor=2, mode="nearest")
        y = self.out(torch.cat([d1, nearest], 1))
        return y.mean((2, 3))  # global average pooling


def _torch(name: str, build, inputs, note: str) -> None:
    register(ZooEntry(name, "torch", build, inputs, "x", _logits, note))


_torch(
    "lstm",
    lambda: RecurrentClassifier(nn.LSTM),
    _sequence(6, 4),
    "nn.LSTM (batch first) -> last hidden state -> linear; explains the input features",
)
_torch(
    "gru",
    lambda: RecurrentClassifier(nn.GRU),
    _sequence(6, 4),
    "nn.GRU (batch first) -> last hidden state -> linear; explains the input features",
)
_torch(
    "transformer_encoder",
    EncoderClassifier,
    _sequence(6, 16),
    "nn.TransformerEncoder (2 layers, batch first) -> mean pooling -> linear",
)
_torch(
    "multihead_attention",
    AttentionBlock,
    _sequence(6, 16),
    "nn.MultiheadAttention block (explicit softmax path) -> mean pooling -> linear",
)
_torch(
    "unet",
    TinyUNet,
    _image(16),
    "small U-Net: ConvTranspose2d, bilinear and nearest upsampling, skip concatenation, GAP",
)
