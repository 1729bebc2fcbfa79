"""EDM2 magnitude-preserving UNet (Karras et al. 2024), the ImageNet-64 network of ECT (REFERENCE §7).

State-dict names follow EDM2's `networks_edm2.UNet` (emb_fourier.freqs, emb_noise.weight, enc['64x64_conv'].weight,
enc['32x32_down'].conv_res0.weight, dec['8x8_in0'].attn_qkv.weight, out_gain, out_conv.weight, ...). Written from
a description of the architecture; the code is original.

One deliberate difference: EDM2 renormalises its weights in place inside forward() in training mode ("forced
weight normalisation"). ECT runs a no-grad target pass with the same weights, which must not mutate them, so
here forward() is pure (it always uses the normalised weight functionally) and the training loop calls
`normalize_weights_()` once per optimiser step instead. Since normalize(normalize(w)) ≈ normalize(w), the
function computed is the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ectune.config import NetConfig
from ectune.nets.dropout import KeyedDropout
from ectune.nets.layers import attention_heads, level_resolutions, maybe_checkpoint


def normalize(x: Tensor, dim: int | list[int] | None = None, eps: float = 1e-4) -> Tensor:
    """Scale x so that each slice along `dim` has unit RMS (norm √(#elements in the slice)); fp32 norm."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: Tensor, mode: str = "keep", f: tuple[float, ...] = (1, 1)) -> Tensor:
    """2× box-filter up/down-sampling per channel: [N, C, H, W] -> [N, C, 2H, 2W] ('up') or [N, C, H/2, W/2]."""
    if mode == "keep":
        return x
    ft = torch.as_tensor(f, dtype=torch.float32)
    pad = (len(f) - 1) // 2
    ft = ft / ft.sum()
    ft = ft.outer(ft)[None, None].to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    if mode == "down":
        return F.conv2d(x, ft.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    if mode == "up":
        return F.conv_transpose2d(x, (ft * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")


def mp_silu(x: Tensor) -> Tensor:
    """SiLU divided by its output RMS under unit-normal input (0.596), so magnitudes are preserved."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving blend (1-t)·a + t·b, rescaled to unit variance for independent unit inputs."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Magnitude-preserving concatenation along `dim` with relative weight t on b."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPFourier(nn.Module):
    """Fixed random Fourier features: [N] -> [N, num_channels] with unit RMS (√2·cos(2πf·x + φ))."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = x.to(torch.float32).outer(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving conv (kernel (k, k)) or linear layer (kernel ()) with weight normalisation.

    weight: [out, in, *kernel]. Conv: x [N, in, H, W] -> [N, out, H, W]; linear: x [N, in] -> [N, out].
    The weight used is normalize(weight)·gain/√fan_in: unit-variance inputs give unit-variance outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = normalize(self.weight.to(torch.float32))  # functional: never mutates the parameter (see module doc)
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalisation: project the stored weight back onto unit-RMS rows."""
        self.weight.copy_(normalize(self.weight.to(torch.float32)))


class Block(nn.Module):
    """EDM2 encoder ('enc') or decoder ('dec') block: resample, residual branch, optional cosine attention.

    forward(x [N, in_channels, H, W], emb [N, emb_channels], dropout_key [N] | None) -> [N, out_channels, H', W'].
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: tuple[float, ...] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        # At least one head: EDM2's widths are all >= 192, but a narrow CPU config would otherwise lose its
        # attention silently (out_channels // 64 = 0).
        self.num_heads = max(1, out_channels // channels_per_head) if attention else 0
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.dropout = KeyedDropout(dropout)
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor, dropout_key: Tensor | None = None) -> Tensor:
        # Main branch: encoder blocks project and pixel-normalise before the residual branch.
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        # Residual branch, modulated multiplicatively by the embedding (gain starts at 0: c = 1).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = self.dropout(y, dropout_key)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Cosine attention: q, k, v pixel-normalised per head. qkv channel layout is [head, channel, (q|k|v)].
        if self.num_heads:
            n, ch, h, w = x.shape
            y = self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(y, dim=2).unbind(3)
            y = attention_heads(q, k, v)
            y = self.attn_proj(y.reshape(n, ch, h, w))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)  # out of place: safe under checkpointing / autograd
        return x


class EDM2UNet(nn.Module):
    """EDM2 UNet. forward(x [N, C, H, W], c_noise [N], class_labels [N, label_dim] | None, *, dropout_key [N] | None)
    -> [N, C, H, W]. x is the preconditioned input c_in·x and c_noise = ln(t)/4.

    Dropout is applied only in blocks whose output resolution is <= cfg.dropout_res (ECT's ImageNet recipe: 16).
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.label_dim = cfg.label_dim
        self.checkpointing = cfg.checkpointing
        self.label_balance = cfg.label_balance
        self.concat_balance = cfg.concat_balance
        cblock = [cfg.model_channels * m for m in cfg.channel_mult]
        cnoise = cfg.model_channels * cfg.channel_mult_noise
        cemb = cfg.model_channels * cfg.channel_mult_emb
        resolutions = level_resolutions(cfg.img_resolution, len(cblock))

        def block(cin: int, cout: int, res: int, **kw: object) -> Block:
            p = cfg.dropout if res <= cfg.dropout_res else 0.0
            return Block(cin, cout, cemb, dropout=p, **kw)  # type: ignore[arg-type]

        self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(cfg.label_dim, cemb, kernel=()) if cfg.label_dim else None

        # Encoder; its input carries one extra constant channel so the first conv can learn a bias.
        self.enc = nn.ModuleDict()
        cout = cfg.img_channels + 1
        for level, (channels, res) in enumerate(zip(cblock, resolutions)):
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, res, flavor="enc", resample_mode="down")
            for idx in range(cfg.num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, res, flavor="enc",
                                                            attention=res in cfg.attn_resolutions)

        # Decoder.
        self.dec = nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = resolutions[level]
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, res, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, res, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, res, flavor="dec", resample_mode="up")
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, res, flavor="dec",
                                                            attention=res in cfg.attn_resolutions)
        self.out_conv = MPConv(cout, cfg.img_channels, kernel=(3, 3))
        self.normalize_weights_()  # start on the unit-RMS sphere, as EDM2's first training step would

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, *,
                dropout_key: Tensor | None = None) -> Tensor:
        # Embedding.
        emb = self.emb_noise(self.emb_fourier(c_noise.reshape(-1)))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device, dtype=emb.dtype)
            class_labels = class_labels.to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            if isinstance(block, Block):
                x = maybe_checkpoint(self.checkpointing, block, x, emb, dropout_key)
            else:
                x = block(x)
            skips.append(x)

        # Decoder.
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = maybe_checkpoint(self.checkpointing, block, x, emb, dropout_key)
        return self.out_conv(x, gain=self.out_gain)

    def set_recompute_norms(self, enabled: bool) -> None:
        """No-op: EDM2 has no GroupNorms (its pixel norms are not recomputed; kept so all nets are treated alike)."""

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """Forced weight normalisation of every MPConv weight, in place (call once per optimiser step)."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.normalize_weight_()
