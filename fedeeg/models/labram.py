"""LaBraM backbone (Jiang et al., ICLR 2024), compatible with the official checkpoints.

The module's parameter names and shapes equal the keys of the official
``labram-base.pth`` after stripping ``student.``, so the published weights load
strictly (see :func:`load_checkpoint`). Every Linear and Conv2d is *called* as a
module (never through ``.weight``), so peft LoRA layers injected into them take
part in the forward pass.

Input convention (as LaBraM): EEG at 200 Hz in units of 0.1 mV (µV / 100), of
shape ``(batch, n_chans, n_times)`` with ``n_times`` a multiple of 200 (one-second
patches) and at most 16 patches.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._hashing import sha256_file
from .._validation import check_option, check_range
from . import _fused_lora, _patch_gemm, _qkv_attention
from ._short_attention import short_attention, short_attention_supported

logger = logging.getLogger(__name__)

#: Keys of the official pretraining checkpoint that fine-tuning drops (after stripping ``student.``).
_PRETRAIN_ONLY_PREFIXES = ("lm_head.", "projection_head.")
_PRETRAIN_ONLY_KEYS = ("mask_token",)
#: Parameters new for fine-tuning: allowed to be missing from a checkpoint.
_NEW_PREFIXES = ("fc_norm.", "head.")
#: Entries of a checkpoint file that may hold the state dict.
_WRAPPER_KEYS = ("model", "module", "state_dict")
#: At most this many keys per category are written into an error message.
_MAX_LISTED = 30


@dataclass(frozen=True)
class LaBraMConfig:
    """Architecture of a LaBraM backbone.

    Parameters
    ----------
    embed_dim : int
        Token width; must equal ``out_chans * 25`` (the temporal convolution
        turns a 200-sample patch into ``out_chans`` maps of 25 steps).
    depth : int
        Number of transformer blocks.
    num_heads : int
        Attention heads; must divide ``embed_dim``.
    out_chans : int
        Feature maps of the temporal convolution (a multiple of 4: GroupNorm
        uses 4 groups).
    mlp_ratio : float
        Hidden width of the MLP relative to ``embed_dim``.
    n_pos : int
        Slots of the channel position embedding (cls + 128 channels).
    n_time : int
        Slots of the time embedding, i.e. the maximum number of patches.
    norm_eps : float
        Epsilon of every LayerNorm (blocks, q/k norms, fc_norm).
    init_values : float
        Initial layer scale (``gamma_1``, ``gamma_2``).
    patch_size : int
        Samples per patch (one second at 200 Hz).
    """

    embed_dim: int
    depth: int
    num_heads: int
    out_chans: int
    mlp_ratio: float = 4.0
    n_pos: int = 129
    n_time: int = 16
    norm_eps: float = 1e-6
    init_values: float = 0.1
    patch_size: int = 200

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "out_chans", "n_pos", "n_time", "patch_size"):
            check_range(name, getattr(self, name), low=1, kind=int)
        check_range("mlp_ratio", self.mlp_ratio, low=0)
        check_range("norm_eps", self.norm_eps, low=0)
        check_range("init_values", self.init_values, low=0)
        if self.out_chans % 4:
            raise ValueError(f"'out_chans' must be a multiple of 4 (GroupNorm with 4 groups), got {self.out_chans}.")
        steps = self.n_steps
        if self.embed_dim != self.out_chans * steps:
            raise ValueError(
                f"'embed_dim' must equal out_chans * {steps} = {self.out_chans * steps} (the temporal convolution yields "
                f"{self.out_chans} maps x {steps} steps per {self.patch_size}-sample patch), got {self.embed_dim}."
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"'embed_dim' ({self.embed_dim}) must be divisible by 'num_heads' ({self.num_heads}).")

    @property
    def n_steps(self) -> int:
        """Time steps per patch after the stride-8 temporal convolution (25 for 200 samples)."""
        return (self.patch_size + 2 * 7 - 15) // 8 + 1

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        """The config as a plain dict."""
        return asdict(self)


#: Named LaBraM sizes. ``labram-small`` is not a published model: it has the same
#: architecture at a tiny width, for tests and CPU demos.
BACKBONES: dict[str, LaBraMConfig] = {
    "labram-small": LaBraMConfig(embed_dim=100, depth=4, num_heads=5, out_chans=4),
    "labram-base": LaBraMConfig(embed_dim=200, depth=12, num_heads=10, out_chans=8),
    "labram-large": LaBraMConfig(embed_dim=400, depth=24, num_heads=16, out_chans=16),
    "labram-huge": LaBraMConfig(embed_dim=800, depth=48, num_heads=16, out_chans=32),
}


@torch.no_grad()
def _trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill with N(0, std²) truncated to [-std, std] (LaBraM's ``trunc_normal_``), in place.

    Inverse-CDF sampling: a fixed handful of ops whatever the tensor size
    (torch's own ``trunc_normal_`` rejection-samples in a loop, which is slow
    on a busy CPU).
    """
    lo = 0.5 * (1.0 + math.erf(-1.0 / math.sqrt(2.0)))  # Φ(-1)
    hi = 1.0 - lo  # Φ(1)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    return tensor.clamp_(-std, std)


class TemporalConv(nn.Module):
    """Patch embedding: three conv → GroupNorm → GELU stages over each patch.

    Maps patches of shape ``(batch, n_patches_total, patch_size)`` to tokens of
    shape ``(batch, n_patches_total, out_chans * 25)``, flattened per patch in
    (step, map) order as in LaBraM.

    Two implementations give the same result (to float rounding), chosen by
    ``fedeeg.models._patch_gemm.MODE`` (environment variable
    ``FEDEEG_PATCH_EMBED``, read at import; default ``'auto'``: ``'gemm'`` on
    CUDA inside ``torch.compile``, ``'conv'`` elsewhere):

    * ``'conv'``: the three ``nn.Conv2d`` (or peft LoRA layers around them),
      ``nn.GroupNorm`` and GELU, on ``(batch, maps, n_tokens, steps)``;
    * ``'gemm'``: each stage as one ``(batch * n_tokens, 200) @ (200, 200)``
      matrix product, the matrix built from the convolution's weights (LoRA
      adapters and their dropout included), GroupNorm computed on those rows
      (see :mod:`fedeeg.models._patch_gemm`). Modules it cannot reproduce
      exactly (DoRA, merged adapters, ...) make it fall back to ``'conv'``.
    """

    def __init__(self, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, out_chans, kernel_size=(1, 15), stride=(1, 8), padding=(0, 7))
        self.norm1 = nn.GroupNorm(4, out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, kernel_size=(1, 3), padding=(0, 1))
        self.norm2 = nn.GroupNorm(4, out_chans)
        self.conv3 = nn.Conv2d(out_chans, out_chans, kernel_size=(1, 3), padding=(0, 1))
        self.norm3 = nn.GroupNorm(4, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, n_tokens, patch_size), n_tokens = n_chans * n_patches (channel-major)
        if _patch_gemm.resolve_mode(x) == "gemm":
            plans = _patch_gemm.stage_plans(self)
            if plans is not None:
                return _patch_gemm.temporal_conv_gemm(self, x, plans)  # (batch, n_tokens, 25 * out_chans)
        x = x.unsqueeze(1)  # (batch, 1, n_tokens, patch_size)
        x = F.gelu(self.norm1(self.conv1(x)))  # (batch, out_chans, n_tokens, 25)
        x = F.gelu(self.norm2(self.conv2(x)))  # (batch, out_chans, n_tokens, 25)
        x = F.gelu(self.norm3(self.conv3(x)))  # (batch, out_chans, n_tokens, 25)
        # 'B C NA T -> B NA (T C)': step-major, then map
        return x.permute(0, 2, 3, 1).flatten(2)  # (batch, n_tokens, 25 * out_chans)


class Attention(nn.Module):
    """Multi-head self-attention with per-head q/k LayerNorm, qkv without bias."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, dim = x.shape  # (batch, n_tokens, embed_dim)
        qkv = self.qkv(x)  # (batch, n_tokens, 3 * embed_dim)
        if _qkv_attention.supported(qkv, self.num_heads, self.q_norm, self.k_norm):
            # CUDA, bf16/fp16: q/k norms and attention in one Triton kernel each way, d(qkv) in qkv's layout
            x = _qkv_attention.qkv_attention(qkv, self.num_heads, self.q_norm, self.k_norm, self.scale)
            return self.proj(x.reshape(batch, n_tokens, dim))  # (batch, n_tokens, embed_dim)
        qkv = qkv.reshape(batch, n_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (batch, num_heads, n_tokens, head_dim)
        # LayerNorm runs in float32 under autocast: bring q, k back to v's dtype.
        q = self.q_norm(q).type_as(v)
        k = self.k_norm(k).type_as(v)
        if short_attention_supported(q, k, v):  # CUDA, bf16/fp16, <= 128 tokens: one fused Triton kernel
            x = short_attention(q, k, v, self.scale)  # (batch, n_tokens, num_heads, head_dim)
        else:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (batch, num_heads, n_tokens, head_dim)
            x = x.transpose(1, 2)  # (batch, n_tokens, num_heads, head_dim)
        x = x.reshape(batch, n_tokens, dim)  # (batch, n_tokens, embed_dim)
        return self.proj(x)  # (batch, n_tokens, embed_dim)


class Mlp(nn.Module):
    """fc1 → GELU → fc2.

    Where ``fc2`` is a fused LoRA Linear on CUDA inside ``torch.compile``
    (see :mod:`fedeeg.models._fused_lora`), the GELU runs inside its LoRA
    input kernel (:func:`fedeeg.models._fused_lora.fused_gelu_linear`).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fc1(x)  # (batch, n_tokens, hidden)
        y = _fused_lora.fused_gelu_linear(self.fc2, f)  # None unless fc2 takes the GELU into its input kernel
        return y if y is not None else self.fc2(F.gelu(f))  # (batch, n_tokens, embed_dim)


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (``gamma_1``, ``gamma_2``)."""

    def __init__(self, cfg: LaBraMConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(cfg.init_values)))
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(cfg.init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x))  # (batch, n_tokens, embed_dim)
        return x + self.gamma_2 * self.mlp(self.norm2(x))  # (batch, n_tokens, embed_dim)


class LaBraM(nn.Module):
    """LaBraM encoder with mean pooling and a linear classification head.

    Parameter names and shapes match the official checkpoint (without the
    ``student.`` prefix); ``fc_norm`` and ``head`` are new for fine-tuning.
    ``norm`` exists for checkpoint compatibility but is not applied (it is the
    identity in LaBraM's mean-pooling fine-tuning forward).

    Prefer :func:`build_backbone`, which initialises the weights from a seed
    without touching the global RNG.

    Parameters
    ----------
    config : LaBraMConfig
        Architecture.
    n_outputs : int
        Number of outputs of the head (classes).

    Notes
    -----
    Call as ``model(x, ch_names)`` with x of shape ``(batch, n_chans, n_times)``
    in 0.1 mV at 200 Hz; ``ch_names`` (length ``n_chans``) are mapped to
    position-embedding slots with :func:`fedeeg.data.channels.input_chans`.
    """

    #: LoRA adapters apply (see :func:`fedeeg.models.apply_lora`); checked by the backbone registry.
    supports_lora = True

    def __init__(self, config: LaBraMConfig, n_outputs: int = 2) -> None:
        super().__init__()
        check_range("n_outputs", n_outputs, low=1, kind=int)
        self.backbone_config = config
        self.n_outputs = n_outputs
        dim = config.embed_dim
        self.patch_embed = TemporalConv(config.out_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_pos, dim))
        self.time_embed = nn.Parameter(torch.zeros(1, config.n_time, dim))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)  # in the checkpoint; identity under mean pooling
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, n_outputs)
        self.backbone_name: str | None = None
        self.checkpoint_sha256: str | None = None
        self._chan_cache: dict[tuple[tuple[str, ...], str], torch.Tensor] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, head_init_scale: float = 0.001) -> None:
        """Initialise as LaBraM does, drawing from the global torch RNG.

        Embeddings and Linear weights: truncated normal (std 0.02, cut at ±std);
        biases 0; LayerNorm 1/0; ``attn.proj`` and ``mlp.fc2`` weights divided by
        ``sqrt(2 * layer_id)``; the head scaled by ``head_init_scale`` (LaBraM's
        ``init_scale``); layer scale = ``init_values``. Convolutions and
        GroupNorms keep PyTorch's default initialisation.
        """
        std = 0.02
        for p in (self.cls_token, self.pos_embed, self.time_embed):
            _trunc_normal_(p, std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, nn.GroupNorm):
                m.reset_parameters()
        for layer_id, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
            blk.gamma_1.fill_(self.backbone_config.init_values)
            blk.gamma_2.fill_(self.backbone_config.init_values)
        self.head.weight.mul_(head_init_scale)
        self.head.bias.mul_(head_init_scale)

    @property
    def embed_dim(self) -> int:
        """Width of the pooled features."""
        return self.backbone_config.embed_dim

    def channel_index(self, ch_names: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Position-embedding slots ``[0] + [vocab index + 1 ...]`` of the channels, shape (1 + n_chans,).

        Cached per tuple of names and device. Inside ``torch.compile`` the
        index is built afresh instead, so that it becomes a constant of the
        compiled graph: a cached tensor made inside a compiled region would
        be an output of that region (which a CUDA-graph replay overwrites)
        and would change the cache that the graph's guards check.

        Raises
        ------
        ValueError
            If a name is not in LaBraM's vocabulary or its slot exceeds ``pos_embed``.
        """
        if isinstance(ch_names, str):
            raise TypeError(f"'ch_names' must be a sequence of channel names, got the string {ch_names!r}.")
        names = tuple(str(c) for c in ch_names)
        if torch.compiler.is_compiling():
            return torch.tensor(self._channel_slots(names), dtype=torch.long, device=device)
        key = (names, str(torch.device(device)))
        idx = self._chan_cache.get(key)
        if idx is not None:
            return idx
        idx = torch.tensor(self._channel_slots(names), dtype=torch.long, device=device)
        self._chan_cache[key] = idx
        return idx

    def _channel_slots(self, names: tuple[str, ...]) -> list[int]:
        """The slots of :meth:`channel_index` as a list of ints (validated)."""
        from ..data.channels import input_chans

        try:
            slots = [int(s) for s in input_chans(list(names))]
        except (KeyError, ValueError) as err:
            raise ValueError(f"Cannot map the channel names to LaBraM's position embedding: {err}") from err
        n_pos = self.pos_embed.shape[1]
        too_far = [f"{n!r} (slot {s})" for n, s in zip(names, slots[1:]) if not 0 < s < n_pos]
        if too_far:
            raise ValueError(
                f"Channel(s) {', '.join(too_far)} have no slot in this backbone's position embedding, which has "
                f"{n_pos} slots (cls + {n_pos - 1} channels); drop or rename these channels."
            )
        return slots

    def _check_input(self, x: torch.Tensor, ch_names: Sequence[str]) -> int:
        """Validate the input; return the number of patches."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (batch, n_chans, n_times), got {type(x).__name__}.")
        if x.ndim != 3:
            raise ValueError(f"x must have shape (batch, n_chans, n_times), got {x.ndim} dimensions {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}.")
        cfg = self.backbone_config
        _, n_chans, n_times = x.shape
        if n_times == 0 or n_times % cfg.patch_size:
            raise ValueError(
                f"n_times must be a positive multiple of {cfg.patch_size} (1-s patches at 200 Hz), got {n_times}; "
                f"resample to 200 Hz and cut windows of whole seconds."
            )
        n_patches = n_times // cfg.patch_size
        if n_patches > cfg.n_time:
            raise ValueError(
                f"x has {n_patches} patches of {cfg.patch_size} samples (n_times={n_times}) but LaBraM has only "
                f"{cfg.n_time} time-embedding slots: use windows of at most {cfg.n_time * cfg.patch_size} samples."
            )
        if isinstance(ch_names, str) or len(ch_names) != n_chans:
            got = "a string" if isinstance(ch_names, str) else f"{len(ch_names)} names"
            raise ValueError(f"ch_names must name each of the {n_chans} channels of x (n_chans={n_chans}), got {got}.")
        return n_patches

    def forward_features(self, x: torch.Tensor, ch_names: Sequence[str]) -> torch.Tensor:
        """Pooled features: mean of the patch tokens after the blocks, then ``fc_norm``.

        Parameters
        ----------
        x : torch.Tensor
            EEG of shape ``(batch, n_chans, n_times)`` in 0.1 mV at 200 Hz;
            ``n_times`` a multiple of 200, at most 16 patches.
        ch_names : sequence of str
            The ``n_chans`` channel names (LaBraM vocabulary, e.g. ``'FP1'``).

        Returns
        -------
        features : torch.Tensor
            Shape ``(batch, embed_dim)``.
        """
        n_patches = self._check_input(x, ch_names)
        idx = self.channel_index(ch_names, x.device)  # (1 + n_chans,)
        if x.dtype != self.cls_token.dtype:
            x = x.to(self.cls_token.dtype)
        batch, n_chans, _ = x.shape
        dim = self.backbone_config.embed_dim
        n_tokens = n_chans * n_patches
        # Channel-major patches: all patches of channel 1, then channel 2, ...
        x = x.reshape(batch, n_tokens, self.backbone_config.patch_size)  # (batch, n_tokens, patch_size)
        x = self.patch_embed(x)  # (batch, n_tokens, embed_dim)
        pos = self.pos_embed[:, idx]  # (1, 1 + n_chans, embed_dim)
        pos_patch = pos[:, 1:].unsqueeze(2).expand(-1, -1, n_patches, -1).reshape(1, n_tokens, dim)  # (1, n_tokens, embed_dim)
        time = self.time_embed[:, :n_patches].unsqueeze(1).expand(-1, n_chans, -1, -1).reshape(1, n_tokens, dim)  # (1, n_tokens, embed_dim)
        cls = (self.cls_token + pos[:, :1]).expand(batch, -1, -1)  # (batch, 1, embed_dim)
        x = torch.cat([cls, x + pos_patch + time], dim=1)  # (batch, 1 + n_tokens, embed_dim)
        for blk in self.blocks:
            x = blk(x)  # (batch, 1 + n_tokens, embed_dim)
        # self.norm is the identity under mean pooling (LaBraM fine-tuning).
        return self.fc_norm(x[:, 1:].mean(dim=1))  # (batch, embed_dim)

    def forward(self, x: torch.Tensor, ch_names: Sequence[str]) -> torch.Tensor:
        """Class logits.

        Parameters
        ----------
        x : torch.Tensor
            EEG of shape ``(batch, n_chans, n_times)`` (see :meth:`forward_features`).
        ch_names : sequence of str
            The ``n_chans`` channel names.

        Returns
        -------
        logits : torch.Tensor
            Shape ``(batch, n_outputs)``.
        """
        return self.head(self.forward_features(x, ch_names))  # (batch, n_outputs)


def build_backbone(
    name: str,
    *,
    n_outputs: int = 2,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    strict: bool = True,
) -> LaBraM:
    """Build a named LaBraM backbone, deterministically initialised from ``seed``.

    The global torch RNG state is left untouched; the same ``seed`` gives
    identical weights.

    Parameters
    ----------
    name : str
        A key of :data:`BACKBONES`.
    n_outputs : int
        Outputs of the classification head.
    seed : int
        Seed of the initialisation (also of ``fc_norm``/``head`` when a
        checkpoint is loaded, as those are new).
    checkpoint : str | Path | None
        Weights to load with :func:`load_checkpoint`.
    strict : bool
        Passed to :func:`load_checkpoint`.

    Returns
    -------
    model : LaBraM
        With ``model.backbone_name`` and ``model.checkpoint_sha256`` (None
        without a checkpoint) set.
    """
    check_option("name", name, BACKBONES)
    check_range("seed", seed, low=0, kind=int)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LaBraM(BACKBONES[name], n_outputs=n_outputs)
    model.backbone_name = name
    model.checkpoint_sha256 = None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict)
    return model


def state_dict_problems(own, state, not_tensors=(), new_prefixes=_NEW_PREFIXES) -> tuple[list[str], list[str]]:
    """What stops ``state`` from loading into a model whose state dict is ``own``.

    Keys starting with ``new_prefixes`` may be missing (a fresh head).

    Returns
    -------
    problems : list of str
        Phrases naming the missing keys, unexpected keys (``not_tensors``
        included) and shape mismatches; empty when everything fits.
    mismatched : list of str
        The keys present on both sides with different shapes.
    """
    missing = [k for k in own if k not in state and not k.startswith(tuple(new_prefixes))]
    unexpected = [k for k in state if k not in own] + list(not_tensors)
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        shapes = [f"{k} (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})" for k in mismatched]
        problems.append(f"shape mismatches: {_listing(shapes)}")
    return problems, mismatched


def _checkpoint_file(path: str | Path) -> tuple[Path, str]:
    """The checkpoint's resolved path and SHA-256; clear errors when it is absent or unreadable."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    if not path.is_file():
        raise ValueError(f"The checkpoint path {str(path)!r} is not a file.")
    try:
        sha = sha256_file(path)
    except OSError as err:
        raise ValueError(f"Cannot read the checkpoint {str(path)!r}: {err}") from err
    return path, sha


def _read_file(path: Path) -> Mapping:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"Could not read the checkpoint {str(path)!r} as safetensors: {err}") from err
    try:
        # argparse.Namespace: training scripts often save their args next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"The checkpoint {str(path)!r} holds objects other than tensors, which FedEEG refuses to unpickle "
            f"(torch.load(..., weights_only=True) failed). Re-save only the weights, e.g. "
            f"torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth') in a trusted environment, "
            f"or convert to .safetensors. Details: {err}"
        ) from err
    except Exception as err:
        raise ValueError(f"Could not read the checkpoint {str(path)!r} with torch.load: {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"The checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict.")
    return obj


def _normalise_state_dict(obj: Mapping, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official / wrapped / plain layouts → (LaBraM state dict, non-tensor keys)."""
    for wrapper in _WRAPPER_KEYS:
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            logger.debug("Checkpoint %s: using its %r entry.", path, wrapper)
            obj = inner
            break
    keys = [str(k) for k in obj]
    if any(k.startswith("student.") for k in keys):
        obj = {k[len("student.") :]: v for k, v in obj.items() if k.startswith("student.")}
    elif keys and all(k.startswith("module.") for k in keys):  # DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    state: dict[str, torch.Tensor] = {}
    not_tensors: list[str] = []
    for k, v in obj.items():
        if k.startswith(_PRETRAIN_ONLY_PREFIXES) or k in _PRETRAIN_ONLY_KEYS:
            continue
        if isinstance(v, torch.Tensor):
            state[k] = v
        else:
            not_tensors.append(k)
    return state, not_tensors


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... ({len(items) - _MAX_LISTED} more)"
    return shown


def load_checkpoint(model: LaBraM, path: str | Path, *, strict: bool = True) -> str:
    """Load LaBraM weights into ``model`` and return the file's SHA-256.

    Accepts the official pretraining file (``{'model': ...}`` or
    ``{'module': ...}`` holding ``student.*`` keys; ``lm_head.*``,
    ``projection_head.*`` and ``mask_token`` are dropped), a plain state dict
    (``.pt``/``.pth``, read with ``weights_only=True``) or a ``.safetensors``
    file. ``fc_norm.*`` and ``head.*`` may be missing (new for fine-tuning).

    Parameters
    ----------
    model : LaBraM
        The backbone (before LoRA is applied).
    path : str | Path
        The checkpoint file.
    strict : bool
        If True (default), any other missing key, unexpected key or shape
        mismatch is a ValueError that names them. If False, load what matches
        and log a warning listing the rest.

    Returns
    -------
    sha256 : str
        Hex digest of the file; also stored as ``model.checkpoint_sha256``.
    """
    if hasattr(model, "peft_config"):
        raise ValueError(
            "load_checkpoint expects the plain backbone, but this model already has peft adapters: load the "
            "checkpoint first (build_backbone(..., checkpoint=path)), then call apply_lora."
        )
    path, sha = _checkpoint_file(path)
    state, not_tensors = _normalise_state_dict(_read_file(path), path)

    own = model.state_dict()
    problems, mismatched = state_dict_problems(own, state, not_tensors)
    new_missing = [k for k in own if k not in state and k.startswith(_NEW_PREFIXES)]
    if problems:
        hint = ""
        if "cls_token" in mismatched:
            width = state["cls_token"].shape[-1]
            fits = [n for n, c in BACKBONES.items() if c.embed_dim == width]
            if fits:
                hint = f" The checkpoint has embed_dim {width}, which matches the backbone {fits[0]!r}."
        summary = f"The checkpoint {str(path)!r} does not match the model: " + "; ".join(problems) + "." + hint
        if strict:
            raise ValueError(summary + " Pass strict=False to load the matching tensors anyway.")
    loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if problems:
        logger.warning("%s Loading the %d matching tensors (strict=False).", summary, len(loadable))
    model.load_state_dict(loadable, strict=False)
    if new_missing:
        logger.info("Checkpoint %s has no %s: they keep their seeded initialisation.", path.name, ", ".join(sorted({k.split('.')[0] for k in new_missing})))
    model.checkpoint_sha256 = sha
    logger.info("Loaded %d tensors from %s (sha256 %s).", len(loadable), path, sha[:12])
    return sha


__all__ = ["LaBraMConfig", "BACKBONES", "LaBraM", "build_backbone", "load_checkpoint"]
