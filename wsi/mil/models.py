"""Attention-MIL models, created by name from a registry (like timm's ``create_model``).

Every model maps one bag of tile features ``x`` (N, D) to a :class:`MILOutput`:

``logits`` (C,)
    the slide's class logits;
``attention`` (K, N)
    attention over the tiles, each row sums to 1; K = 1, or C for ``clam_mb`` (one branch per class);
``tile_logits`` (N, C)
    per-tile class logits (softmax gives the per-tile class scores written to the stores);
``aux_loss``
    a scalar the trainer adds to the bag loss: CLAM's weighted instance-clustering loss, else 0.

Per-tile class scores
---------------------
``abmil``, ``clam_sb`` and ``clam_mb`` pool tile embeddings ``h_i`` with attention ``a_i`` and classify the
pooled embedding with an affine head ``W``. We apply the same head to every ``h_i``: because the ``a_i`` sum to
1, the slide logits are *exactly* the attention-weighted mean of these tile logits, so the tile scores
decompose the slide decision (and the forward pass computes the slide logits that way). CLAM's instance
classifiers are trained on attention pseudo-labels only; they shape the embedding but are not used as scores.
``transmil`` has no such identity: its tile logits are the classifier head applied to each tile's output token,
and its attention is the class token's exact softmax attention over the tiles in the last layer (Nyström
attention is only used to mix the tokens), averaged over heads.

Reproducibility
---------------
:meth:`MILModel.seed` re-initialises every parameter from a ``torch.Generator`` and makes dropout draw its masks
from it (or from a second generator on the model's device), so a fold trains to the same weights whatever else
runs in the process (torch's global RNG is shared by all threads of a Dask worker).

>>> import torch
>>> model = create_model("abmil", in_dim=16, n_classes=2, hidden_dim=32)
>>> out = model(torch.randn(10, 16))
>>> out.logits.shape, out.attention.shape, out.tile_logits.shape, round(out.attention.sum().item(), 5)
(torch.Size([2]), torch.Size([1, 10]), torch.Size([10, 2]), 1.0)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

_MODELS: dict[str, Callable[..., MILModel]] = {}


def register_model(name: str):
    """Decorator: register a builder ``(in_dim, n_classes, **options) -> MILModel`` under ``name``."""

    def add(builder):
        if name in _MODELS:
            raise ValueError(f"MIL model {name!r} is registered twice")
        _MODELS[name] = builder
        return builder

    return add


def list_models() -> list[str]:
    """Names :func:`create_model` accepts."""
    return sorted(_MODELS)


def _builder(name: str):
    if name not in _MODELS:
        raise ConfigError(None, f"unknown MIL model {name!r}", f"choose one of: {', '.join(list_models())}")
    return _MODELS[name]


def model_config(name: str, in_dim: int, n_classes: int, options: dict) -> dict:
    """The full keyword arguments of model ``name``: the options its builder declares are taken from
    ``options`` (e.g. the ``mil`` config section), the others keep the builder's defaults. Stored in the
    run's ``run.json`` so that :func:`create_model` rebuilds the same network."""
    params = inspect.signature(_builder(name)).parameters
    chosen = {k: options[k] for k in params if k in options and k not in ("in_dim", "n_classes")}
    return {"name": name, "in_dim": int(in_dim), "n_classes": int(n_classes), **chosen}


def create_model(name: str, **kwargs) -> MILModel:
    """A freshly initialised model; unknown names are a :class:`ConfigError` listing the known ones."""
    return _builder(name)(**kwargs)


# ------------------------------------------------------------------------------------------ building blocks
@dataclass
class MILOutput:
    logits: torch.Tensor        # (C,)
    attention: torch.Tensor     # (K, N), rows sum to 1
    tile_logits: torch.Tensor   # (N, C)
    aux_loss: torch.Tensor      # scalar

    def attention_for(self, class_index: int) -> torch.Tensor:
        """(N,) the attention branch that decided ``class_index`` (the only branch unless K = C)."""
        return self.attention[class_index if self.attention.shape[0] > 1 else 0]


class SeededDropout(nn.Module):
    """Dropout whose masks come from ``self.generator`` (set by :meth:`MILModel.seed`) when one is set."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


class MILModel(nn.Module):
    """Base class: ``forward(x (N, D), label=None) -> MILOutput``; ``label`` only feeds auxiliary losses."""

    def forward(self, x: torch.Tensor, label: int | None = None) -> MILOutput:
        raise NotImplementedError

    def seed(self, generator: torch.Generator, dropout: torch.Generator | None = None) -> None:
        """Re-initialise all weights from ``generator`` (PyTorch's default uniform(+-1/sqrt(fan_in)) scheme;
        norms reset to identity) and route dropout masks through ``dropout`` (default: ``generator``), which
        must be on the device the model runs on."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                    bound = 1.0 / math.sqrt(m.weight[0].numel())
                    m.weight.uniform_(-bound, bound, generator=generator)
                    if m.bias is not None:
                        m.bias.uniform_(-bound, bound, generator=generator)
                elif isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
                elif isinstance(m, SeededDropout):
                    m.generator = dropout or generator


def _embedding(in_dim: int, hidden_dim: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), SeededDropout(dropout))


class GatedAttention(nn.Module):
    """Gated attention (Ilse et al. 2018): softmax over tiles of ``w^T (tanh(V h) * sigmoid(U h))``, with
    ``branches`` independent score rows."""

    def __init__(self, dim: int, attention_dim: int, branches: int, dropout: float):
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), SeededDropout(dropout))
        self.gate = nn.Sequential(nn.Linear(dim, attention_dim), nn.Sigmoid(), SeededDropout(dropout))
        self.score = nn.Linear(attention_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.score(self.value(h) * self.gate(h)).T, dim=1)


# ------------------------------------------------------------------------------------------ ABMIL and CLAM
class GatedAttentionMIL(MILModel):
    """ABMIL, CLAM-SB and CLAM-MB: an embedding, gated attention (one branch, or one per class) and a linear
    head; CLAM adds instance classifiers trained on the most and least attended tiles (Lu et al. 2021).

    Instance-clustering loss, for a bag of class ``y``: the ``k_sample`` most attended tiles of branch ``y`` are
    pseudo-labelled positive and the ``k_sample`` least attended negative for class ``y``'s instance classifier;
    with more than two classes the ``k_sample`` most attended tiles of every other branch are also negatives
    for that class (CLAM's subtyping setting). The loss is the mean cross-entropy over these terms, times
    ``instance_loss_weight``.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int, dropout: float, *,
                 per_class_attention: bool, instance_loss_weight: float, k_sample: int):
        super().__init__()
        self.n_classes = n_classes
        self.embed = _embedding(in_dim, hidden_dim, dropout)
        # attention width half the embedding width, as in CLAM's 512 -> 256
        self.attention = GatedAttention(hidden_dim, max(1, hidden_dim // 2),
                                        n_classes if per_class_attention else 1, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)
        self.instance_loss_weight = float(instance_loss_weight)
        self.k_sample = int(k_sample)
        # one two-way (evidence of class c: yes/no) instance classifier per class, as a single layer
        self.instance_classifiers = nn.Linear(hidden_dim, 2 * n_classes) if instance_loss_weight > 0 else None

    def forward(self, x: torch.Tensor, label: int | None = None) -> MILOutput:
        h = self.embed(x)
        attention = self.attention(h)                                  # (K, N)
        tile_logits = self.classifier(h)                               # (N, C)
        branch_per_class = attention.expand(self.n_classes, -1) if attention.shape[0] == 1 else attention
        logits = (branch_per_class.T * tile_logits).sum(dim=0)        # == classifier(attention @ h)
        aux = logits.new_zeros(())
        if self.instance_classifiers is not None and label is not None and self.training:
            aux = self.instance_loss_weight * self._instance_loss(h, attention, int(label))
        return MILOutput(logits, attention, tile_logits, aux)

    def _instance_loss(self, h: torch.Tensor, attention: torch.Tensor, label: int) -> torch.Tensor:
        k = min(self.k_sample, h.shape[0] // 2)
        if k == 0:
            return h.new_zeros(())
        instance_logits = self.instance_classifiers(h).view(h.shape[0], self.n_classes, 2)
        # pseudo-labels made on the device: k positives then k negatives (the first k of them: k negatives)
        targets = (torch.arange(2 * k, device=h.device) < k).long()
        losses = []
        for c in range(self.n_classes):
            branch = attention[c if attention.shape[0] > 1 else 0]
            top = torch.topk(branch, k).indices
            if c == label:
                index, target = torch.cat([top, torch.topk(-branch, k).indices]), targets
            elif self.n_classes > 2:
                index, target = top, targets[k:]
            else:
                continue
            losses.append(nn.functional.cross_entropy(instance_logits[index, c], target))
        return torch.stack(losses).mean()


@register_model("abmil")
def abmil(in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25) -> MILModel:
    """Gated attention-MIL (Ilse et al. 2018)."""
    return GatedAttentionMIL(in_dim, n_classes, hidden_dim, dropout, per_class_attention=False,
                             instance_loss_weight=0.0, k_sample=0)


@register_model("clam_sb")
def clam_sb(in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25,
            instance_loss_weight: float = 0.3, k_sample: int = 8) -> MILModel:
    """CLAM single-branch: one attention branch, instance-clustering loss."""
    return GatedAttentionMIL(in_dim, n_classes, hidden_dim, dropout, per_class_attention=False,
                             instance_loss_weight=instance_loss_weight, k_sample=k_sample)


@register_model("clam_mb")
def clam_mb(in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25,
            instance_loss_weight: float = 0.3, k_sample: int = 8) -> MILModel:
    """CLAM multi-branch: one attention branch per class, instance-clustering loss."""
    return GatedAttentionMIL(in_dim, n_classes, hidden_dim, dropout, per_class_attention=True,
                             instance_loss_weight=instance_loss_weight, k_sample=k_sample)


# ------------------------------------------------------------------------------------------ TransMIL
def _segment_means(x: torch.Tensor, segments: int) -> torch.Tensor:
    """(H, n, d) -> (H, segments, d): means of ``segments`` contiguous, near-equal, non-empty runs of rows."""
    n = x.shape[1]
    bounds = torch.div(torch.arange(segments + 1, device=x.device) * n, segments, rounding_mode="floor")
    cumulative = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x.cumsum(dim=1)], dim=1)
    sums = cumulative[:, bounds[1:]] - cumulative[:, bounds[:-1]]
    return sums / (bounds[1:] - bounds[:-1]).to(x.dtype).view(1, -1, 1)


def _iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix by Razavi et al.'s iteration (as Nyströmformer), in
    float32 also under autocast: the iteration multiplies near-singular products, which bf16's 8-bit mantissa
    turns into noise."""
    with torch.autocast(a.device.type, enabled=False):
        a = a.float()
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        z = a.transpose(-1, -2) / (a.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
                                   * a.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1))
        for _ in range(iterations):
            az = a @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromSelfAttention(nn.Module):
    """Multi-head self-attention approximated with ``landmarks`` segment-mean landmarks (Xiong et al. 2021),
    exact when the sequence is not longer than that, plus a depthwise convolution of the values along the
    sequence. Costs O(n * landmarks) instead of O(n^2), so 10,000-tile bags fit."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float, *, pinv_iterations: int = 6,
                 conv_kernel: int = 33):
        super().__init__()
        if dim % heads:
            raise ConfigError(None, f"transmil: hidden_dim {dim} is not divisible by {heads} heads")
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), SeededDropout(dropout))
        self.value_conv = nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads,
                                    bias=False)

    def forward(self, x: torch.Tensor, n_tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (n, dim) -> (n, dim); with ``n_tiles``, also the exact attention (n_tiles,) of token 0 (the
        class token) over tokens 1..n_tiles, averaged over heads."""
        n, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = self.qkv(x).view(n, 3, self.heads, head_dim).permute(1, 2, 0, 3)   # each (H, n, d)
        q = q * head_dim ** -0.5
        if n <= self.landmarks:
            mixed = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            q_land, k_land = _segment_means(q, self.landmarks), _segment_means(k, self.landmarks)
            kernel_1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)
            kernel_2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)
            kernel_3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)
            mixed = (kernel_1 @ _iterative_pinv(kernel_2, self.pinv_iterations)) @ (kernel_3 @ v)
        mixed = mixed + self.value_conv(v.unsqueeze(0)).squeeze(0)
        y = self.out(mixed.permute(1, 0, 2).reshape(n, dim))
        cls_attention = None
        if n_tiles is not None:
            cls_attention = torch.softmax(q[:, 0:1] @ k[:, 1:n_tiles + 1].transpose(-1, -2), dim=-1)
            cls_attention = cls_attention.mean(dim=0).view(n_tiles)
        return y, cls_attention


class PositionalConv(nn.Module):
    """TransMIL's PPEG: tile tokens laid out on a square grid get depthwise 7/5/3 convolutions added."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        cls, grid = tokens[:1], tokens[1:].T.reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.reshape(tokens.shape[1], -1).T])


class TransMIL(MILModel):
    """TransMIL (Shao et al. 2021): tile embeddings padded to a square grid, a class token, Nyström
    self-attention, PPEG positional convolution, a second attention layer, and a head on the class token."""

    def __init__(self, in_dim: int, n_classes: int, hidden_dim: int, dropout: float, heads: int):
        super().__init__()
        self.embed = _embedding(in_dim, hidden_dim, dropout)
        self.cls_token = nn.Parameter(torch.zeros(1, hidden_dim))
        landmarks = max(1, hidden_dim // 2)
        self.norm_1, self.norm_2 = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.attend_1 = NystromSelfAttention(hidden_dim, heads, landmarks, dropout)
        self.attend_2 = NystromSelfAttention(hidden_dim, heads, landmarks, dropout)
        self.position = PositionalConv(hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def seed(self, generator: torch.Generator, dropout: torch.Generator | None = None) -> None:
        super().seed(generator, dropout)
        with torch.no_grad():
            self.cls_token.normal_(generator=generator)

    def forward(self, x: torch.Tensor, label: int | None = None) -> MILOutput:
        n = x.shape[0]
        h = self.embed(x)
        side = math.ceil(math.sqrt(n))
        # the grid is filled by repeating the first tiles; only the n real tiles are scored
        padding = torch.arange(side * side - n, device=x.device) % n
        tokens = torch.cat([self.cls_token, h, h[padding]])
        tokens = tokens + self.attend_1(self.norm_1(tokens))[0]
        tokens = self.position(tokens, side)
        mixed, attention = self.attend_2(self.norm_2(tokens), n_tiles=n)
        tokens = self.norm(tokens + mixed)
        logits = self.classifier(tokens[0])
        tile_logits = self.classifier(tokens[1:n + 1])
        return MILOutput(logits, attention.view(1, n), tile_logits, logits.new_zeros(()))


@register_model("transmil")
def transmil(in_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.25,
             heads: int = 8) -> MILModel:
    """TransMIL with Nyström attention (landmarks = hidden_dim / 2)."""
    return TransMIL(in_dim, n_classes, hidden_dim, dropout, heads)
