"""Networks: DDPM++ (CIFAR-10) and the EDM2 magnitude-preserving UNet (ImageNet-64).

Every network built here has the same call:

    net(x [N, C, H, W], c_noise [N], class_labels [N, label_dim] | None = None,
        augment_labels [N, augment_dim] | None = None, *, dropout_key [N] | None = None) -> [N, C, H, W]

with x = c_in·x_t and c_noise = ln(t)/4 supplied by the preconditioner, and `net.normalize_weights_()`, which the
training loop calls after each optimiser step (EDM2's forced weight normalisation; a no-op for DDPM++).
"""

from __future__ import annotations

from torch import nn

from ectune.config import NetConfig
from ectune.nets.ddpmpp import DDPMppUNet
from ectune.nets.dropout import KeyedDropout, assign_dropout_salts
from ectune.nets.edm2 import EDM2UNet
from ectune.nets.layers import count_params

__all__ = ["build_net", "count_params", "SMALL_CONFIGS", "PAPER_CONFIGS", "DDPMppUNet", "EDM2UNet", "KeyedDropout"]


def build_net(cfg: NetConfig) -> nn.Module:
    """Build the network `cfg.arch` describes, with its dropout layers salted for keyed dropout.

    Build under `with torch.device("meta"):` to get shapes and parameter counts without allocating memory.
    """
    if cfg.arch == "ddpmpp":
        net: nn.Module = DDPMppUNet(cfg)
    elif cfg.arch == "edm2":
        net = EDM2UNet(cfg)
    else:
        raise ValueError(f"NetConfig.arch must be 'ddpmpp' or 'edm2', got {cfg.arch!r}")
    assign_dropout_salts(net)
    return net


# Configurations of the paper (REFERENCE §7, Tab. 7). DDPM++ CIFAR-10 as in the public EDM checkpoints
# (augment_dim 9); dropout values are ECT's.
PAPER_CONFIGS: dict[str, NetConfig] = {
    "cifar10-ddpmpp": NetConfig(arch="ddpmpp", img_resolution=32, img_channels=3, label_dim=0, model_channels=128,
                                channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.2,
                                embedding_type="positional", augment_dim=9),
    **{
        f"img64-{size}": NetConfig(arch="edm2", img_resolution=64, img_channels=3, label_dim=1000, model_channels=mc,
                                   channel_mult=(1, 2, 3, 4), channel_mult_noise=1, channel_mult_emb=4, num_blocks=3,
                                   attn_resolutions=(16, 8), dropout=p, dropout_res=16, label_balance=0.5,
                                   concat_balance=0.5)
        for size, mc, p in [("s", 192, 0.4), ("m", 256, 0.5), ("l", 320, 0.5), ("xl", 384, 0.5)]
    },
    # EDM2's ImageNet-512 networks: the same UNet on 4×64×64 Stable Diffusion VAE latents; dropout is EDM2's
    # (0 up to S, 0.10 from M, at every resolution); the tuning presets set ECT's.
    **{
        f"img512-{size}": NetConfig(arch="edm2", img_resolution=64, img_channels=4, label_dim=1000, model_channels=mc,
                                    channel_mult=(1, 2, 3, 4), channel_mult_noise=1, channel_mult_emb=4, num_blocks=3,
                                    attn_resolutions=(16, 8), dropout=0.0 if mc <= 192 else 0.1, label_balance=0.5,
                                    concat_balance=0.5)
        for size, mc in [("xxs", 64), ("xs", 128), ("s", 192), ("m", 256), ("l", 320), ("xl", 384), ("xxl", 448)]
    },
}

# Small networks for single-channel images on a few CPU cores. Channels grow towards the low resolutions, where they
# cost parameters but few FLOPs. "tiny" (32×32) is for tests; "small" is the CPU demo's, at Fashion-MNIST's native
# 28×28 (levels 28/14/7): half the FLOPs of 24 base channels at 32×32 padded, which on a 2-core CPU trains twice the
# images per minute and gave clearer samples for the same minutes (docs/performance.md). Derive others with
# dataclasses.replace(cfg, img_channels=3, label_dim=10, ...).
SMALL_CONFIGS: dict[str, NetConfig] = {
    "tiny": NetConfig(arch="ddpmpp", img_resolution=32, img_channels=1, model_channels=16, channel_mult=(1, 2, 2),
                      channel_mult_emb=2, num_blocks=2, attn_resolutions=(8,), dropout=0.1),
    "small": NetConfig(arch="ddpmpp", img_resolution=28, img_channels=1, model_channels=16, channel_mult=(1, 2, 4),
                       channel_mult_emb=4, num_blocks=2, attn_resolutions=(7,), dropout=0.1),
    "tiny-edm2": NetConfig(arch="edm2", img_resolution=32, img_channels=1, model_channels=16, channel_mult=(1, 2, 2),
                           channel_mult_emb=2, num_blocks=2, attn_resolutions=(8,), dropout=0.1, dropout_res=16,
                           concat_balance=0.5),
    "small-edm2": NetConfig(arch="edm2", img_resolution=28, img_channels=1, model_channels=16, channel_mult=(1, 2, 4),
                            channel_mult_emb=4, num_blocks=2, attn_resolutions=(7,), dropout=0.1, dropout_res=16,
                            concat_balance=0.5),
}
