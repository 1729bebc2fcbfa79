"""Networks: paper parameter counts, EDM/EDM2 state-dict names, forward contract, keyed dropout, checkpointing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ectune.config import NetConfig
from ectune.nets import PAPER_CONFIGS, SMALL_CONFIGS, build_net, count_params
from ectune.nets.dropout import KeyedDropout
from ectune.nets.edm2 import MPLinear
from ectune.nets.layers import attention_heads




TINY = {
    "ddpmpp": SMALL_CONFIGS["tiny"],
    "edm2": SMALL_CONFIGS["tiny-edm2"],
}


def meta_net(cfg: NetConfig) -> torch.nn.Module:
    """Build without allocating memory: enough for shapes, names and parameter counts."""
    with torch.device("meta"):
        return build_net(cfg)


def perturbed(cfg: NetConfig, seed: int = 0) -> torch.nn.Module:
    """A built net whose zero-initialised gains/residual convs are moved off zero, so outputs are informative."""
    torch.manual_seed(seed)
    net = build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def inputs(cfg: NetConfig, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, generator=g)
    c_noise = torch.randn(n, generator=g)
    labels = None
    if cfg.label_dim:
        labels = torch.nn.functional.one_hot(torch.randint(0, cfg.label_dim, (n,), generator=g), cfg.label_dim).float()
    return x, c_noise, labels


# ---------------------------------------------------------------------------------------------- parameter counts


def test_ddpmpp_cifar10_param_count() -> None:
    # The public EDM CIFAR-10 checkpoints have augment_dim = 9 (map_augment, 9·128 = 1152 weights) and label_dim 0.
    cfg = PAPER_CONFIGS["cifar10-ddpmpp"]
    n = count_params(meta_net(cfg))
    n_noaug = count_params(meta_net(dataclasses.replace(cfg, augment_dim=0)))
    print(f"DDPM++ CIFAR-10: {n} parameters (augment_dim=9, label_dim=0); {n_noaug} without map_augment")
    assert n == 55_733_891
    assert n - n_noaug == 9 * 128
    assert 55.6e6 <= n <= 55.8e6


@pytest.mark.parametrize("size, expected_m", [("s", 280.2), ("m", 497.8), ("l", 777.5), ("xl", 1119.3)])
def test_edm2_imagenet64_param_counts(size: str, expected_m: float) -> None:
    n = count_params(meta_net(PAPER_CONFIGS[f"img64-{size}"]))
    print(f"EDM2 ImageNet-64 {size.upper()}: {n} parameters")
    assert abs(n / 1e6 - expected_m) <= 0.1


def test_small_configs_sizes() -> None:
    tiny = count_params(build_net(SMALL_CONFIGS["tiny"]))
    small = count_params(build_net(SMALL_CONFIGS["small"]))
    assert 0.3e6 <= tiny <= 0.7e6
    assert 0.8e6 <= small <= 1.3e6


# ---------------------------------------------------------------------------------------------- checkpoint names


def test_ddpmpp_state_dict_names_match_edm() -> None:
    sd = meta_net(PAPER_CONFIGS["cifar10-ddpmpp"]).state_dict()
    expected_shapes = {
        "map_augment.weight": (128, 9),
        "map_layer0.weight": (512, 128),
        "map_layer0.bias": (512,),
        "map_layer1.weight": (512, 512),
        "enc.32x32_conv.weight": (128, 3, 3, 3),
        "enc.32x32_block0.norm0.weight": (128,),
        "enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
        "enc.32x32_block0.affine.weight": (256, 512),
        "enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "enc.16x16_block0.norm2.weight": (256,),
        "enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "enc.16x16_block0.proj.weight": (256, 256, 1, 1),
        "dec.8x8_in0.qkv.weight": (768, 256, 1, 1),
        "dec.8x8_in1.conv1.weight": (256, 256, 3, 3),
        "dec.8x8_block0.conv0.weight": (256, 512, 3, 3),
        "dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "dec.16x16_block4.qkv.weight": (768, 256, 1, 1),
        "dec.32x32_aux_norm.weight": (256,),
        "dec.32x32_aux_conv.weight": (3, 256, 3, 3),
        "dec.32x32_aux_conv.bias": (3,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "map_label.weight" not in sd and "map_noise.freqs" not in sd  # positional embedding: no buffer
    assert "enc.16x16_block3.qkv.weight" in sd and "dec.16x16_block3.qkv.weight" not in sd  # dec: last block only
    assert not any("dropout" in k for k in sd)
    assert len(sd) == 425  # regression pin: 417 parameters + 8 resample_filter buffers


def test_edm2_state_dict_names_match_edm2() -> None:
    sd = meta_net(PAPER_CONFIGS["img64-s"]).state_dict()
    expected_shapes = {
        "out_gain": (),
        "emb_fourier.freqs": (192,),
        "emb_fourier.phases": (192,),
        "emb_noise.weight": (768, 192),
        "emb_label.weight": (768, 1000),
        "enc.64x64_conv.weight": (192, 4, 3, 3),  # 3 image channels + the constant channel
        "enc.64x64_block0.emb_gain": (),
        "enc.64x64_block0.conv_res0.weight": (192, 192, 3, 3),
        "enc.64x64_block0.emb_linear.weight": (192, 768),
        "enc.32x32_down.conv_res0.weight": (192, 192, 3, 3),
        "enc.32x32_block0.conv_skip.weight": (384, 192, 1, 1),
        "enc.16x16_block0.attn_qkv.weight": (1728, 576, 1, 1),
        "enc.16x16_block0.attn_proj.weight": (576, 576, 1, 1),
        "dec.8x8_in0.attn_qkv.weight": (2304, 768, 1, 1),
        "dec.8x8_block0.conv_res0.weight": (768, 1536, 3, 3),  # decoder: conv_res0 sees the concatenated input
        "dec.8x8_block0.conv_skip.weight": (768, 1536, 1, 1),
        "dec.64x64_up.conv_res1.weight": (384, 384, 3, 3),  # up blocks keep the coarser width
        "out_conv.weight": (3, 192, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "enc.64x64_block0.attn_qkv.weight" not in sd
    assert not any(k.endswith(".bias") for k in sd)  # magnitude-preserving layers have no biases


# ---------------------------------------------------------------------------------------------- forward contract


@pytest.mark.parametrize("arch", ["ddpmpp", "edm2"])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_forward_shapes(arch: str, label_dim: int) -> None:
    cfg = dataclasses.replace(TINY[arch], img_channels=3, label_dim=label_dim)
    net = build_net(cfg).eval()
    x, c_noise, labels = inputs(cfg)
    y = net(x, c_noise, labels)
    assert y.shape == x.shape and y.dtype == torch.float32
    if label_dim:
        assert net(x, c_noise, None).shape == x.shape  # missing labels = the zero (unconditional) label


@pytest.mark.parametrize("arch", ["ddpmpp", "edm2"])
def test_autocast_output_stays_low_precision(arch: str) -> None:
    net = perturbed(TINY[arch]).eval()
    x, c_noise, labels = inputs(TINY[arch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x, c_noise, labels)
    assert y.dtype == torch.bfloat16  # the preconditioner, not the net, returns to fp32
    assert torch.isfinite(y.float()).all()


def test_edm2_output_zero_at_init_and_ddpmpp_near_zero() -> None:
    x, c_noise, _ = inputs(TINY["edm2"])
    assert build_net(TINY["edm2"])(x, c_noise).abs().max() == 0  # out_gain starts at 0
    assert build_net(TINY["ddpmpp"])(x, c_noise).abs().max() < 1e-2  # aux_conv init weight 1e-5


def test_bad_resolution_is_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_net(dataclasses.replace(TINY["ddpmpp"], img_resolution=30))


def test_attention_matches_explicit_softmax() -> None:
    q, k, v = torch.randn(3, 2, 4, 8, 10, dtype=torch.float64).unbind(0)  # [N, heads, c, L]
    w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    expected = torch.einsum("nhqk,nhck->nhcq", w, v)
    torch.testing.assert_close(attention_heads(q, k, v), expected)


# ---------------------------------------------------------------------------------------------- keyed dropout


def test_build_net_salts_every_dropout_layer() -> None:
    for arch in ("ddpmpp", "edm2"):
        salts = [m.salt for m in build_net(TINY[arch]).modules() if isinstance(m, KeyedDropout)]
        assert len(salts) > 0 and len(set(salts)) == len(salts) and 0 not in salts


@pytest.mark.parametrize("arch", ["ddpmpp", "edm2"])
def test_dropout_mask_follows_key_for_any_subset(arch: str) -> None:
    cfg = dataclasses.replace(TINY[arch], dropout=0.3, dropout_res=1 << 30)
    net = perturbed(cfg).train()
    x, c_noise, labels = inputs(cfg, n=6)
    key = torch.arange(100, 106)
    with torch.no_grad():
        full = net(x, c_noise, labels, dropout_key=key)
        rows = torch.tensor([4, 1, 3])
        sub = net(x[rows], c_noise[rows], labels, dropout_key=key[rows])
        other = net(x, c_noise, labels, dropout_key=key + 1)
        no_drop = net.eval()(x, c_noise, labels)
    torch.testing.assert_close(sub, full[rows], rtol=1e-4, atol=1e-5)  # same mask for the same rows
    assert not torch.allclose(other, full)  # other keys, other masks
    assert not torch.allclose(no_drop, full)  # dropout is actually active in training mode


def test_edm2_dropout_only_at_low_resolutions() -> None:
    net = build_net(dataclasses.replace(TINY["edm2"], dropout=0.4, dropout_res=16))
    for name, m in net.named_modules():
        if isinstance(m, KeyedDropout):
            res = int(name.split(".")[1].split("x")[0])
            assert m.p == (0.4 if res <= 16 else 0.0), name


# ---------------------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("arch", ["ddpmpp", "edm2"])
def test_checkpointing_gives_same_output_and_grads(arch: str) -> None:
    cfg = dataclasses.replace(TINY[arch], dropout=0.2, dropout_res=1 << 30)
    net_a = perturbed(cfg).train()
    net_b = build_net(dataclasses.replace(cfg, checkpointing=True)).train()
    net_b.load_state_dict(net_a.state_dict())
    x, c_noise, labels = inputs(cfg)
    key = torch.arange(4)
    ya = net_a(x, c_noise, labels, dropout_key=key)
    yb = net_b(x, c_noise, labels, dropout_key=key)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(ya, yb)
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_norms_give_bit_identical_grads_and_save_less(dtype: torch.dtype) -> None:
    cfg = dataclasses.replace(TINY["ddpmpp"], dropout=0.2)
    net = perturbed(cfg).train()
    x, c_noise, _ = inputs(cfg)
    key = torch.arange(4)
    results = []
    for recompute in (False, True):
        net.set_recompute_norms(recompute)
        saved = []
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage()) or t, lambda t: t):
                y = net(x, c_noise, dropout_key=key)
        y.float().square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in net.parameters()],
                        sum(st.nbytes() for st in {st.data_ptr(): st for st in saved}.values())))
        net.zero_grad(set_to_none=True)
    (ya, ga, saved_a), (yb, gb, saved_b) = results
    assert torch.equal(ya, yb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))  # the same kernels on the same inputs
    assert saved_b < 0.85 * saved_a, (saved_b, saved_a)


def test_recompute_norms_choice() -> None:
    from ectune.training.fastpath import recompute_norms

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert recompute_norms("auto", cuda, compiled=False) and not recompute_norms("auto", cpu, compiled=False)
    assert not recompute_norms("auto", cuda, compiled=True)  # inductor chooses what to recompute
    assert recompute_norms("on", cpu, compiled=False) and not recompute_norms("off", cuda, compiled=False)
    with pytest.raises(ValueError, match="recompute-norms"):
        recompute_norms("sometimes", cpu, compiled=False)


# ---------------------------------------------------------------------------------------------- EDM2 weight norm


def test_edm2_forward_never_mutates_weights_and_normalize_is_explicit() -> None:
    net = perturbed(TINY["edm2"]).train()  # perturbation moves the weights off the unit-RMS sphere
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, c_noise, _ = inputs(TINY["edm2"])
    with torch.no_grad():
        y0 = net(x, c_noise, dropout_key=torch.arange(4))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # a no-grad target pass must leave the weights alone
    net.normalize_weights_()
    for m in net.modules():
        if isinstance(m, MPLinear):
            rms = m.weight.flatten(1).square().mean(dim=1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        y1 = net(x, c_noise, dropout_key=torch.arange(4))
    torch.testing.assert_close(y0, y1, rtol=1e-3, atol=1e-4)  # forward already used the normalised weights


def test_ddpmpp_has_noop_normalize_weights() -> None:
    net = build_net(TINY["ddpmpp"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.normalize_weights_()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
