"""The EDM2 UNet (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 2-3
and App. B), the network ECT tunes on ImageNet 64×64 (REFERENCE §7).

Provenance: written for ectune from that paper's description of its magnitude-preserving ("MP") design and
checked against the outputs of the official network on fixed inputs (`tests/test_net_fixtures.py`). No code of
the EDM, EDM2 or ECT repositories is used. Module and parameter names are those of the public EDM2 checkpoints
(`emb_fourier`, `emb_noise`, `enc.64x64_block0.conv_res0`, `emb_gain`, `attn_qkv`, `out_gain`, ...), because
checkpoints are loaded by name; that naming is the only thing taken from them.

The design keeps every activation at unit magnitude, with no normalisation layers and no biases:
- every weight tensor is used with each output row normalised to unit L2 norm ("forced weight normalisation"),
  so a layer maps unit-variance inputs to unit-variance outputs; training also rescales the stored weights
  (`normalize_weights_`), which keeps the effective learning rate constant;
- SiLU is divided by 0.596, its output's RMS on unit-normal input; sums and concatenations are weighted so the
  result has unit variance again (`mp_blend`, `mp_concat`);
- encoder blocks normalise each pixel's feature vector; attention normalises q, k and v per head (64 channels
  per head; narrower layers have no attention);
- the noise level enters through random Fourier features, the conditioning scales each residual branch by
  1 + gain·Linear(emb), and learned scalar gains that start at zero (`emb_gain`, `out_gain`) make the
  initial network output exactly zero;
- the input gets a constant channel of ones, so the first convolution can see the image border.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ectune.config import NetConfig
from ectune.nets.dropout import KeyedDropout
from ectune.nets.layers import attention_heads, level_resolutions, maybe_checkpoint

Resample = Literal["none", "up", "down"]

HEAD_CHANNELS = 64
RESIDUAL_BALANCE = 0.3  # weight of the residual branch against the shortcut
ATTENTION_BALANCE = 0.3
ACTIVATION_CLIP = 256.0  # guards the fp16/bf16 range; never reached by a healthy network
SILU_RMS = 0.596  # RMS of SiLU(z) for z ~ N(0, 1)


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_normalize(x: Tensor, dim: int | tuple[int, ...], eps: float = 1e-4) -> Tensor:
    """x / (ε + RMS of x over `dim`): unit root-mean-square along `dim`, ε guarding against zero vectors."""
    rms = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_at_least_fp32(x.dtype))
    rms = rms / math.sqrt(x.numel() // rms.numel())  # norm → RMS: divide by √(elements reduced per vector)
    return x / (eps + rms).to(x.dtype)


def mp_silu_unit(x: Tensor) -> Tensor:
    """SiLU rescaled to unit RMS on unit-normal input."""
    return F.silu(x) / SILU_RMS


def mp_blend(a: Tensor, b: Tensor, t: float) -> Tensor:
    """(1−t)·a + t·b, divided by √((1−t)² + t²): unit variance again for independent unit-variance a, b."""
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t * t)


def mp_concat(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Concatenate along channels, a weighted by (1−t) and b by t *in total* whatever their widths, the result
    scaled to unit variance: each channel of a gets w_a = s·(1−t)/√N_a, each of b gets w_b = s·t/√N_b, with
    s = √((N_a + N_b) / ((1−t)² + t²))."""
    na, nb = a.shape[1], b.shape[1]
    s = math.sqrt((na + nb) / ((1 - t) ** 2 + t * t))
    return torch.cat([a * (s * (1 - t) / math.sqrt(na)), b * (s * t / math.sqrt(nb))], dim=1)


class MPLinear(nn.Module):
    """A bias-free convolution (kernel (k, k)) or linear map (kernel ()) whose weight is used normalised: each
    output row scaled to unit L2 norm, times `gain`. The stored `weight` starts unit normal."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain: float | Tensor = 1.0) -> Tensor:
        w = self.weight.to(_at_least_fp32(self.weight.dtype))
        fan_in = w[0].numel()
        # rows of unit RMS, divided by √fan_in: rows of unit norm
        return rms_normalize(w, dim=tuple(range(1, w.ndim))) * (gain / math.sqrt(fan_in))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = self.effective_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalisation: store the weight with unit-RMS rows (the form the forward uses)."""
        self.weight.copy_(rms_normalize(self.weight, dim=tuple(range(1, self.weight.ndim))))


class FourierFeatures(nn.Module):
    """√2·cos(f_i·c + φ_i) with f_i ~ N(0, (2π)²) and φ_i ~ U(0, 2π) fixed at construction (buffers `freqs`,
    `phases`): unit-variance features of the noise level."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, c_noise: Tensor) -> Tensor:
        angle = c_noise.float()[:, None] * self.freqs.float()[None, :] + self.phases.float()[None, :]
        return (math.sqrt(2) * angle.cos()).to(c_noise.dtype)


class MPBlock(nn.Module):
    """One EDM2 residual block, encoder or decoder flavour.

    Encoder: resample → (1×1 conv to the new width) → pixel norm → x; decoder: resample → x, and the 1×1 conv (when
    the width changes) is applied to the shortcut only. Both then add the branch
        MP-SiLU → conv → ·(1 + gain·Linear(emb)) → MP-SiLU → dropout → conv
    with balance 0.3, optionally followed by multi-head attention (balance 0.3), and clip to ±256.
    `takes_skip` marks decoder blocks whose input is the concatenation [x, encoder skip].
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, encoder: bool,
                 resample: Resample = "none", attention: bool = False, dropout: float = 0.0,
                 takes_skip: bool = False) -> None:
        super().__init__()
        self.encoder, self.resample, self.takes_skip = encoder, resample, takes_skip
        # The encoder projects before the branch (which then runs at the output width); the decoder's branch
        # runs from the concatenated input.
        branch_in = out_channels if encoder else in_channels
        self.conv_res0 = MPLinear(branch_in, out_channels, (3, 3))
        self.emb_linear = MPLinear(emb_channels, out_channels)
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.dropout = KeyedDropout(dropout)
        self.conv_res1 = MPLinear(out_channels, out_channels, (3, 3))
        self.conv_skip = MPLinear(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.heads = out_channels // HEAD_CHANNELS if attention else 0
        if self.heads:
            self.attn_qkv = MPLinear(out_channels, 3 * out_channels, (1, 1))
            self.attn_proj = MPLinear(out_channels, out_channels, (1, 1))

    def forward(self, x: Tensor, emb: Tensor, dropout_key: Tensor | None = None) -> Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.encoder:
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = rms_normalize(x, dim=1)  # pixel norm: each position's feature vector to unit RMS
        h = self.conv_res0(mp_silu_unit(x))
        modulation = self.emb_linear(emb, gain=self.emb_gain) + 1
        h = mp_silu_unit(h * modulation[:, :, None, None].to(h.dtype))
        h = self.conv_res1(self.dropout(h, dropout_key))
        if not self.encoder and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_blend(x, h, RESIDUAL_BALANCE)
        if self.heads:
            x = mp_blend(x, self.attn_proj(self._attend(x)), ATTENTION_BALANCE)
        return x.clamp(-ACTIVATION_CLIP, ACTIVATION_CLIP)

    def _attend(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        # attn_qkv's output channels are ordered (head, channel, q/k/v); q, k, v are normalised per head.
        qkv = rms_normalize(self.attn_qkv(x).reshape(n, self.heads, c // self.heads, 3, h * w), dim=2)
        q, k, v = qkv.unbind(3)
        return attention_heads(q, k, v).reshape(n, c, h, w)


class EDM2UNet(nn.Module):
    """EDM2 UNet, F(x, c_noise, class_labels) → [N, C, H, W]. Missing labels of a conditional net = zero label."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        widths = [mc * m for m in cfg.channel_mult]
        noise_ch, emb_ch = mc * cfg.channel_mult_noise, mc * cfg.channel_mult_emb
        self.emb_fourier = FourierFeatures(noise_ch)
        self.emb_noise = MPLinear(noise_ch, emb_ch)
        self.emb_label = MPLinear(cfg.label_dim, emb_ch) if cfg.label_dim else None

        def block(c_in: int, c_out: int, res: int, **kw: object) -> MPBlock:
            p = cfg.dropout if res <= cfg.dropout_res else 0.0
            return MPBlock(c_in, c_out, emb_ch, dropout=p, **kw)  # type: ignore[arg-type]

        levels = level_resolutions(cfg.img_resolution, len(widths))
        self.enc = nn.ModuleDict()
        skip_widths: list[int] = []
        c = cfg.img_channels + 1  # + the constant channel
        for level, (res, width) in enumerate(zip(levels, widths)):
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = MPLinear(c, width, (3, 3))
                c = width
            else:
                self.enc[f"{tag}_down"] = block(c, c, res, encoder=True, resample="down")
            skip_widths.append(c)
            for i in range(cfg.num_blocks):
                self.enc[f"{tag}_block{i}"] = block(c, width, res, encoder=True, attention=res in cfg.attn_resolutions)
                c = width
                skip_widths.append(c)

        self.dec = nn.ModuleDict()
        for level in reversed(range(len(levels))):
            res, width = levels[level], widths[level]
            tag = f"{res}x{res}"
            if level == len(levels) - 1:
                self.dec[f"{tag}_in0"] = block(c, c, res, encoder=False, attention=True)
                self.dec[f"{tag}_in1"] = block(c, c, res, encoder=False)
            else:
                self.dec[f"{tag}_up"] = block(c, c, res, encoder=False, resample="up")
            for i in range(cfg.num_blocks + 1):
                self.dec[f"{tag}_block{i}"] = block(c + skip_widths.pop(), width, res, encoder=False,
                                                    attention=res in cfg.attn_resolutions, takes_skip=True)
                c = width
        self.out_conv = MPLinear(c, cfg.img_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros([]))

    def embed(self, c_noise: Tensor, class_labels: Tensor | None) -> Tensor:
        """The conditioning vector every block receives."""
        e = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(c_noise.shape[0], self.cfg.label_dim, device=c_noise.device)
            # One-hot labels scaled to unit mean square, so both inputs of the blend have unit magnitude.
            label = self.emb_label(class_labels.to(e.dtype) * math.sqrt(self.cfg.label_dim))
            e = mp_blend(e, label, self.cfg.label_balance)
        return mp_silu_unit(e)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None, *, dropout_key: Tensor | None = None) -> Tensor:
        if augment_labels is not None:
            raise ValueError("EDM2 networks take no augment_labels (only DDPM++ with augment_dim > 0 does)")
        emb = self.embed(c_noise, class_labels)
        ckpt = self.cfg.checkpointing
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for layer in self.enc.values():
            x = layer(x) if isinstance(layer, MPLinear) else maybe_checkpoint(ckpt, layer, x, emb, dropout_key)
            skips.append(x)
        for layer in self.dec.values():
            if layer.takes_skip:
                x = mp_concat(x, skips.pop(), self.cfg.concat_balance)
            x = maybe_checkpoint(ckpt, layer, x, emb, dropout_key)
        return self.out_conv(x, gain=self.out_gain)

    def normalize_weights_(self) -> None:
        """Forced weight normalisation of every weight (called after each optimiser step)."""
        for m in self.modules():
            if isinstance(m, MPLinear):
                m.normalize_weight_()

    def set_recompute_norms(self, enabled: bool) -> None:
        """No-op: EDM2 has no GroupNorm to recompute (kept so every network answers the same calls)."""
