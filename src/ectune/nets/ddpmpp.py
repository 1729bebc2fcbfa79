"""DDPM++: the CIFAR-10 UNet of Song et al. (2021) in the configuration of the EDM paper (Karras et al. 2022,
App. F.2 and Tab. 7), the network ECT tunes on CIFAR-10 (REFERENCE §7).

Provenance: written for ectune from those papers' description of the architecture and checked against the outputs
of the official network on fixed inputs (`tests/test_net_fixtures.py`). No code of the EDM, EDM2 or ECT
repositories is used. The module and parameter names are those of the public EDM checkpoints (`enc.32x32_conv`,
`map_layer0`, `norm0`/`conv0`/`affine`/..., `resample_filter`), because checkpoints are loaded by name; that
naming is the only thing taken from them.

Shape of the network (channels `C·m` at each level, `N` residual blocks per level):

    c_noise ─ sinusoidal features [sin | cos] ─(+ label, + augmentation labels)─ Linear─SiLU─Linear─SiLU ─ emb
    x ─ conv ─ N blocks ─ down ─ N blocks ─ ... (every output kept as a skip)
      ─ 2 blocks at the coarsest level (the first with attention)
      ─ per level, finest last: (up) ─ N+1 blocks, each fed [x, skip] ─ GroupNorm─SiLU─conv ─ output

A residual block is  (x → GN → SiLU → conv (resample) → + Linear(emb) → GN → SiLU → dropout → conv) plus a shortcut
(a 1×1 conv when the width or resolution changes), the sum scaled by √½; with attention, a single-head
self-attention on GN(x) follows, its residual sum also scaled by √½ (both keep the variance of a sum of two
unit-variance terms at one).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ectune.config import NetConfig
from ectune.nets.dropout import KeyedDropout
from ectune.nets.layers import attention_heads, level_resolutions, maybe_checkpoint

Resample = Literal["none", "up", "down"]

RESIDUAL_SCALE = math.sqrt(0.5)  # the sum of two unit-variance branches, scaled back to unit variance
BRANCH_END_GAIN = 1e-5  # last layer of every residual branch and the output start almost at zero
QKV_GAIN = math.sqrt(0.2)


def _xavier(module: nn.Conv2d | nn.Linear, gain: float = 1.0) -> None:
    """Xavier-uniform weights scaled by `gain`, zero bias (EDM's DDPM++ initialisation)."""
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def group_count(channels: int) -> int:
    """At most 32 groups of at least 4 channels (EDM's rule); for widths it leaves indivisible (e.g. 144 in the
    `small` CPU config), the largest count below that which divides the width."""
    return max(g for g in range(1, max(1, min(32, channels // 4)) + 1) if channels % g == 0)


class GroupNorm(nn.GroupNorm):
    """Group normalisation over `group_count(channels)` groups, ε = 1e-6.

    Under autocast it runs in the activation's dtype: autocast would otherwise promote `group_norm` to fp32 and
    every norm → SiLU → conv chain would write and read fp32 tensors (the statistics are still accumulated in
    fp32 by the kernels).
    """

    def __init__(self, channels: int) -> None:
        super().__init__(num_groups=group_count(channels), num_channels=channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _silu_of_norm(norm: GroupNorm, x: Tensor) -> Tensor:
    return F.silu(norm(x))


def silu_norm(norm: GroupNorm, x: Tensor, recompute: bool) -> Tensor:
    """SiLU(GroupNorm(x)). With `recompute` (and a backward to come) the normalised tensor is not kept for the
    backward pass but recomputed from `x`: the same kernels on the same inputs, so gradients are bit-identical."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(_silu_of_norm, norm, x, use_reentrant=False)
    return _silu_of_norm(norm, x)


class Conv(nn.Conv2d):
    """A 'same'-padded convolution, optionally preceded by ×2 resampling with a separable FIR filter.

    The filter [1, 1] (the box) makes 'down' a 2×2 average and 'up' a nearest-neighbour doubling. It is stored as
    the buffer `resample_filter` [1, 1, k, k] (normalised to sum 1), as in the EDM checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, resample: Resample = "none",
                 gain: float = 1.0, fir: tuple[int, ...] = (1, 1)) -> None:
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        _xavier(self, gain)
        self.resample = resample
        if resample != "none":
            taps = torch.tensor(fir, dtype=torch.float32)
            self.register_buffer("resample_filter", (taps.outer(taps) / taps.sum().square())[None, None])

    def forward(self, x: Tensor) -> Tensor:
        if self.resample != "none":
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            per_channel = f.repeat(x.shape[1], 1, 1, 1)
            if self.resample == "up":  # zero-stuffing transpose conv: ×4 keeps the mean of each 2×2 output cell
                x = F.conv_transpose2d(x, per_channel * 4, stride=2, padding=pad, groups=x.shape[1])
            else:
                x = F.conv2d(x, per_channel, stride=2, padding=pad, groups=x.shape[1])
        return super().forward(x)


def _linear(in_features: int, out_features: int, *, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    _xavier(layer)
    return layer


class ResBlock(nn.Module):
    """One residual block of DDPM++ (see the module docstring), optionally resampling, optionally with attention.

    `takes_skip` marks decoder blocks whose input is the concatenation [x, encoder skip].
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, resample: Resample = "none",
                 attention: bool = False, dropout: float = 0.0, takes_skip: bool = False) -> None:
        super().__init__()
        self.takes_skip = takes_skip
        self.recompute_norms = False
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv(in_channels, out_channels, 3, resample=resample)
        self.affine = _linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.dropout = KeyedDropout(dropout)
        self.conv1 = Conv(out_channels, out_channels, 3, gain=BRANCH_END_GAIN)
        self.skip = None
        if in_channels != out_channels or resample != "none":
            self.skip = Conv(in_channels, out_channels, 1, resample=resample)
        self.heads = 1 if attention else 0  # DDPM++ uses one head whatever the width
        if self.heads:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv(out_channels, 3 * out_channels, 1, gain=QKV_GAIN)
            self.proj = Conv(out_channels, out_channels, 1, gain=BRANCH_END_GAIN)

    def forward(self, x: Tensor, emb: Tensor, dropout_key: Tensor | None = None) -> Tensor:
        h = self.conv0(silu_norm(self.norm0, x, self.recompute_norms))
        h = h + self.affine(emb)[:, :, None, None].to(h.dtype)  # the noise level (and label) enter as a bias
        h = self.dropout(silu_norm(self.norm1, h, self.recompute_norms), dropout_key)
        h = self.conv1(h)
        x = (h + (x if self.skip is None else self.skip(x))) * RESIDUAL_SCALE
        if self.heads:
            x = (x + self.proj(self._attend(self.norm2(x)))) * RESIDUAL_SCALE
        return x

    def _attend(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        # qkv's output channels are ordered (head, channel, q/k/v): q, k and v of one channel sit side by side.
        q, k, v = self.qkv(x).reshape(n, self.heads, c // self.heads, 3, h * w).unbind(3)
        return attention_heads(q, k, v).reshape(n, c, h, w)


def sinusoidal_features(c_noise: Tensor, channels: int, *, max_period: float = 10_000.0) -> Tensor:
    """[sin(c·ω_i) | cos(c·ω_i)] with ω_i = max_period^(−i/(n−1)), i = 0 … n−1, n = channels/2 (so ω runs from 1
    down to exactly 1/max_period) — the transformer positional encoding, sines first as DDPM++ consumes it."""
    n = channels // 2
    omega = max_period ** (-torch.arange(n, dtype=torch.float32, device=c_noise.device) / (n - 1))
    angle = c_noise.float()[:, None] * omega[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1).to(c_noise.dtype)


class FourierFeatures(nn.Module):
    """Random Fourier features [sin(2π f_i c) | cos(2π f_i c)], f_i ~ N(0, 16²) fixed at construction (NCSN++'s
    noise embedding); the frequencies are the buffer `freqs`."""

    def __init__(self, channels: int, *, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, c_noise: Tensor) -> Tensor:
        angle = (2 * math.pi) * c_noise.float()[:, None] * self.freqs.float()[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=1).to(c_noise.dtype)


class DDPMppUNet(nn.Module):
    """DDPM++ noise-conditional UNet, F(x, c_noise, class_labels[, augment_labels]) → [N, C, H, W].

    `augment_labels` [N, augment_dim] is EDM's augmentation conditioning (9 numbers describing a geometric/colour
    augmentation); omitted, it contributes nothing. Missing class labels of a conditional net are the zero label.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        noise_ch, emb_ch = mc * cfg.channel_mult_noise, mc * cfg.channel_mult_emb
        self.noise_channels = noise_ch
        self.map_noise = FourierFeatures(noise_ch) if cfg.embedding_type == "fourier" else None
        self.map_label = _linear(cfg.label_dim, noise_ch) if cfg.label_dim else None
        self.map_augment = _linear(cfg.augment_dim, noise_ch, bias=False) if cfg.augment_dim else None
        self.map_layer0 = _linear(noise_ch, emb_ch)
        self.map_layer1 = _linear(emb_ch, emb_ch)

        def block(c_in: int, c_out: int, res: int, **kw: object) -> ResBlock:
            p = cfg.dropout if res <= cfg.dropout_res else 0.0
            return ResBlock(c_in, c_out, emb_ch, dropout=p, **kw)  # type: ignore[arg-type]

        levels = level_resolutions(cfg.img_resolution, len(cfg.channel_mult))
        self.enc = nn.ModuleDict()
        skip_widths: list[int] = []
        width = mc
        for level, (res, mult) in enumerate(zip(levels, cfg.channel_mult)):
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv(cfg.img_channels, width, 3)
            else:
                self.enc[f"{tag}_down"] = block(width, width, res, resample="down")
            skip_widths.append(width)
            for i in range(cfg.num_blocks):
                self.enc[f"{tag}_block{i}"] = block(width, mc * mult, res, attention=res in cfg.attn_resolutions)
                width = mc * mult
                skip_widths.append(width)

        self.dec = nn.ModuleDict()
        for level in reversed(range(len(levels))):
            res, tag = levels[level], f"{levels[level]}x{levels[level]}"
            if level == len(levels) - 1:
                self.dec[f"{tag}_in0"] = block(width, width, res, attention=True)
                self.dec[f"{tag}_in1"] = block(width, width, res)
            else:
                self.dec[f"{tag}_up"] = block(width, width, res, resample="up")
            for i in range(cfg.num_blocks + 1):
                last = i == cfg.num_blocks
                self.dec[f"{tag}_block{i}"] = block(width + skip_widths.pop(), mc * cfg.channel_mult[level], res,
                                                    attention=last and res in cfg.attn_resolutions, takes_skip=True)
                width = mc * cfg.channel_mult[level]
        top = f"{levels[0]}x{levels[0]}"
        self.dec[f"{top}_aux_norm"] = GroupNorm(width)
        self.dec[f"{top}_aux_conv"] = Conv(width, cfg.img_channels, 3, gain=BRANCH_END_GAIN)
        self._out_norm, self._out_conv = f"{top}_aux_norm", f"{top}_aux_conv"

    def embed(self, c_noise: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        """The conditioning vector every residual block receives."""
        if self.map_noise is None:
            e = sinusoidal_features(c_noise, self.noise_channels)
        else:
            e = self.map_noise(c_noise)
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(c_noise.shape[0], self.cfg.label_dim, device=c_noise.device)
            # One-hot labels scaled to unit mean square, like the other inputs of the mapping network.
            e = e + self.map_label(class_labels.to(e.dtype) * math.sqrt(self.cfg.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            e = e + self.map_augment(augment_labels.to(e.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(e))))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None, *, dropout_key: Tensor | None = None) -> Tensor:
        emb = self.embed(c_noise, class_labels, augment_labels)
        ckpt = self.cfg.checkpointing
        skips = []
        for layer in self.enc.values():
            x = layer(x) if isinstance(layer, Conv) else maybe_checkpoint(ckpt, layer, x, emb, dropout_key)
            skips.append(x)
        for layer in self.dec.values():
            if not isinstance(layer, ResBlock):
                continue  # the output head, applied below
            if layer.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = maybe_checkpoint(ckpt, layer, x, emb, dropout_key)
        out_norm: GroupNorm = self.dec[self._out_norm]  # type: ignore[assignment]
        return self.dec[self._out_conv](F.silu(out_norm(x)))

    def normalize_weights_(self) -> None:
        """No-op: DDPM++ has no forced weight normalisation (EDM2 has)."""

    def set_recompute_norms(self, enabled: bool) -> None:
        """Recompute GroupNorm + SiLU in backward instead of saving their output (see `silu_norm`)."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.recompute_norms = enabled
