"""DDPM++ ("SongUNet" in EDM): the CIFAR-10 network of EDM and ECT (REFERENCE §7).

Module and parameter names follow EDM's `networks.SongUNet` exactly (map_noise, map_layer0, enc['32x32_conv'],
enc['16x16_down'].conv0.resample_filter, dec['32x32_aux_norm'], ...), so a public EDM checkpoint loads key for
key. Only the configuration EDM uses for DDPM++ is implemented: standard encoder and decoder, no adaptive
scale, resample_proj on, one attention head, GroupNorm eps 1e-6, skip scale 1/√2. Written from a description of
that architecture; the code is original.

Differences from EDM that do not change the maths: every dropout is a `KeyedDropout` fed with the per-sample
key, attention uses scaled_dot_product_attention, and blocks can be gradient-checkpointed.
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

InitMode = Literal["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"]


def weight_init(shape: tuple[int, ...], mode: InitMode, fan_in: int, fan_out: int) -> Tensor:
    """EDM's weight initialisers: Xavier/Kaiming, uniform or normal, from explicit fans."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}")


class Linear(nn.Module):
    """y = x·Wᵀ + b. x: [N, in_features] -> [N, out_features]. Parameters: weight [out, in], bias [out]."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, init_mode: InitMode = "xavier_uniform",
                 init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init((out_features, in_features), **fans) * init_weight)
        self.bias = nn.Parameter(weight_init((out_features,), **fans) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """Convolution with optional 2× up/down-sampling by a separable FIR filter applied before it.

    x: [N, in_channels, H, W] -> [N, out_channels, H', W'] with H' = 2H (up), H/2 (down) or H.
    kernel = 0 gives a pure resampler without weights (EDM uses it for parameter-free skips).
    The filter is kept as the buffer `resample_filter` ([1, 1, k, k]) exactly as EDM stores it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: tuple[int, ...] = (1, 1), init_mode: InitMode = "xavier_uniform",
                 init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init((out_channels, in_channels, kernel, kernel), **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init((out_channels,), **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.outer(f)[None, None] / f.sum().square()  # normalised so that resampling preserves the mean
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        c = x.shape[1]
        if self.up:
            # ×4 because a stride-2 transposed conv spreads each input over 4 outputs (keeps the mean).
            x = F.conv_transpose2d(x, f.mul(4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=f_pad)
        if self.down:
            x = F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with at most 32 groups and at least `min_channels_per_group` channels per group (as EDM)."""

    def __init__(self, num_channels: int, *, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        while num_channels % groups:  # EDM's configurations always divide; odd widths fall back to a divisor
            groups -= 1
        self.num_groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        # Runs in x's dtype even under autocast. CUDA autocast would run group_norm in fp32, so every
        # norm → SiLU → (dropout) → conv chain would write, save for backward and re-read fp32 activations that
        # the next conv casts straight back to bf16. The kernel accumulates its statistics in fp32 for bf16
        # input either way (EDM's fp16 mode runs its norms in fp16 for the same reason).
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _silu_of_norm(norm: GroupNorm, x: Tensor) -> Tensor:
    return F.silu(norm(x))


def norm_silu(norm: GroupNorm, x: Tensor, recompute: bool) -> Tensor:
    """SiLU(GroupNorm(x)); with `recompute`, backward recomputes both from x instead of keeping the norm's output.

    The convolution that follows saves its own input (the SiLU output) and x is kept for the residual path anyway,
    so only the norm's output is freed: about a quarter of a block's saved activations for one more pass over them
    in backward (measured with benchmarks/step_anatomy.py). The recomputation runs the same kernels on the same
    input, so gradients are bit-identical. Skipped without grad and inside torch.compile, whose partitioner
    chooses what to recompute itself.
    """
    if recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return checkpoint(_silu_of_norm, norm, x, use_reentrant=False)
    return _silu_of_norm(norm, x)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar: [N] -> [N, num_channels] laid out [cos | sin]."""

    def __init__(self, num_channels: int, *, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.outer(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar: [N] -> [N, num_channels]; buffer `freqs` [num_channels/2]."""

    def __init__(self, num_channels: int, *, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = x.outer((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """Pre-activation residual block with embedding-conditioned bias, optional resampling and self-attention.

    forward(x [N, in_channels, H, W], emb [N, emb_channels], dropout_key [N] | None) -> [N, out_channels, H', W'].
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int = 1, dropout: float = 0.0, skip_scale: float = math.sqrt(0.5),
                 eps: float = 1e-6, resample_filter: tuple[int, ...] = (1, 1), resample_proj: bool = True) -> None:
        super().__init__()
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)  # residual branches start near identity
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads if attention else 0
        self.skip_scale = skip_scale
        self.recompute_norms = False  # see norm_silu; set by SongUNet.set_recompute_norms

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.dropout = KeyedDropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter,
                               **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor, dropout_key: Tensor | None = None) -> Tensor:
        orig = x
        x = self.conv0(norm_silu(self.norm0, x, self.recompute_norms))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        x = norm_silu(self.norm1, x + params, self.recompute_norms)
        x = self.conv1(self.dropout(x, dropout_key))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            n, c, h, w = x.shape
            # EDM's qkv channel layout is [head, channel, (q|k|v)]: keep it so checkpoints load unchanged.
            q, k, v = self.qkv(self.norm2(x)).reshape(n, self.num_heads, c // self.num_heads, 3, h * w).unbind(3)
            a = attention_heads(q, k, v)
            x = (self.proj(a.reshape(n, c, h, w)) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """DDPM++ UNet. forward(x [N, C, H, W], c_noise [N], class_labels [N, label_dim] | None, *, dropout_key [N] | None,
    augment_labels [N, augment_dim] | None) -> [N, C, H, W].

    x is the preconditioned input c_in·x and c_noise = ln(t)/4 (the preconditioner computes both).
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.label_dim = cfg.label_dim
        self.checkpointing = cfg.checkpointing
        mc = cfg.model_channels
        emb_channels = mc * cfg.channel_mult_emb
        noise_channels = mc * cfg.channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        resolutions = level_resolutions(cfg.img_resolution, len(cfg.channel_mult))

        def block(cin: int, cout: int, res: int, **kw: bool) -> UNetBlock:
            p = cfg.dropout if res <= cfg.dropout_res else 0.0
            return UNetBlock(cin, cout, emb_channels, dropout=p, **kw)

        # Mapping network: noise (+ label, + augmentation) embedding -> emb [N, emb_channels].
        if cfg.embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        elif cfg.embedding_type == "fourier":
            self.map_noise = FourierEmbedding(noise_channels)
        else:
            raise ValueError(f"NetConfig.embedding_type must be 'positional' or 'fourier', got {cfg.embedding_type!r}")
        self.map_label = Linear(cfg.label_dim, noise_channels, **init) if cfg.label_dim else None
        self.map_augment = Linear(cfg.augment_dim, noise_channels, bias=False, **init) if cfg.augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = cfg.img_channels
        for level, (mult, res) in enumerate(zip(cfg.channel_mult, resolutions)):
            if level == 0:
                cin, cout = cout, mc
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, res, down=True)
            for idx in range(cfg.num_blocks):
                cin, cout = cout, mc * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, res, attention=res in cfg.attn_resolutions)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = resolutions[level]
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, res, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, res)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, res, up=True)
            for idx in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), mc * mult
                attn = idx == cfg.num_blocks and res in cfg.attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, res, attention=attn)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, cfg.img_channels, 3, **init_zero)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, *,
                dropout_key: Tensor | None = None, augment_labels: Tensor | None = None) -> Tensor:
        # Mapping.
        emb = self.map_noise(c_noise.reshape(-1))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin | cos], the order EDM trained with
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device, dtype=emb.dtype)
            # √label_dim makes a one-hot vector unit-variance per element.
            emb = emb + self.map_label(class_labels.to(emb.dtype) * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        for block in self.enc.values():
            if isinstance(block, UNetBlock):
                x = maybe_checkpoint(self.checkpointing, block, x, emb, dropout_key)
            else:
                x = block(x)
            skips.append(x)

        # Decoder.
        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = maybe_checkpoint(self.checkpointing, block, x, emb, dropout_key)
        return out

    def normalize_weights_(self) -> None:
        """No-op: DDPM++ has no forced weight normalisation (kept so the training loop treats all nets alike)."""

    def set_recompute_norms(self, enabled: bool) -> None:
        """Recompute every block's GroupNorm + SiLU in backward instead of saving the norm output (`norm_silu`)."""
        for m in self.modules():
            if isinstance(m, UNetBlock):
                m.recompute_norms = bool(enabled)
