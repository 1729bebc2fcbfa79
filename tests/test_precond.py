import dataclasses

import pytest
import torch
from torch import nn

from ectune.precond import Precond, edm_scalings

from conftest import cpu_has_bf16


@pytest.mark.parametrize(
    "t, expected",
    [(0.821, (0.270551, 0.427039, 1.040290, -0.049308)), (80.0, (3.9e-05, 0.499990, 0.0125, 1.095507))],
)
def test_edm_scalings_hand_values(t, expected):
    got = edm_scalings(torch.tensor(t, dtype=torch.float64), sigma_data=0.5)
    for g, e in zip(got, expected):
        assert g.item() == pytest.approx(e, abs=1e-5)


class Junk(nn.Module):
    """A network whose output is garbage (and NaN at c_noise = -inf): the boundary must not depend on it."""

    def forward(self, x, c_noise, class_labels=None, *, dropout_key=None):
        return x * 1e3 + c_noise.reshape(-1, 1, 1, 1)


def test_boundary_is_exact_and_output_fp32():
    f = Precond(Junk())
    x = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.0, 1.0, 0.0])
    out = f(x, sigma)
    assert out.dtype == torch.float32
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.equal(out[1], x[1])


def test_shifted_boundary_is_explicit_option():
    x = torch.randn(2, 1, 4, 4)
    f = Precond(Junk(), sigma_min_shift=0.002)
    out = f(x, torch.full((2,), 0.002))
    assert torch.allclose(out, x)  # exact at σ_min with the shift
    assert not torch.allclose(Precond(Junk())(x, torch.full((2,), 0.002)), x)


def test_class_labels_become_one_hot():
    seen = {}

    class Spy(nn.Module):
        def forward(self, x, c_noise, class_labels=None, *, dropout_key=None):
            seen["labels"] = class_labels
            return x

    f = Precond(Spy(), label_dim=4)
    f(torch.randn(2, 1, 2, 2), 1.0, torch.tensor([1, 3]))
    assert seen["labels"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="class-conditional"):
        f(torch.randn(2, 1, 2, 2), 1.0)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU build has no bf16 autocast")
def test_bf16_autocast_never_reaches_the_loss():
    from conftest import TinyNet
    from ectune.losses import consistency_loss
    from ectune.nets import SMALL_CONFIGS, build_net

    seen = []
    for net in (TinyNet(dropout=0.2), build_net(SMALL_CONFIGS["tiny"])):
        net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        f = Precond(net, compute_dtype=torch.bfloat16).train()
        x0 = torch.rand(4, 1, 32, 32) * 2 - 1
        t = torch.tensor([0.5, 1.0, 2.0, 10.0])
        out = f(x0, t)
        assert out.dtype == torch.float32
        loss = consistency_loss(f, x0, t, 0.5 * t, torch.randn_like(x0), dropout_key=torch.arange(4))
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
        loss.sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in net.parameters() if p.grad is not None)
    assert seen and all(d == torch.bfloat16 for d in seen)  # the inner network really ran in bf16


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU build has no bf16 autocast")
def test_bf16_loss_and_gradients_agree_with_fp32():
    """The same step in bf16 and fp32 (same weights, noise, (t, r) and dropout keys) agrees within bf16 tolerance."""
    from ectune.losses import consistency_loss
    from ectune.nets import SMALL_CONFIGS, build_net

    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL_CONFIGS["tiny"], dropout=0.2)
    f32 = Precond(build_net(cfg)).train()
    f16 = Precond(build_net(cfg), compute_dtype=torch.bfloat16).train()
    with torch.no_grad():  # away from the near-zero init, so the comparison is not trivially small
        for p in f32.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    f16.load_state_dict(f32.state_dict())
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 32, 32, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.exp(torch.randn(8, generator=g) * 1.2 - 0.8)
    results = []
    for f in (f32, f16):
        loss = consistency_loss(f, x0, t, 0.6 * t, eps, dropout_key=torch.arange(8))
        loss.sum().backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in f.net.parameters()])))
    (l32, g32), (l16, g16) = results

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(l16, l32) < 5e-3 and rel(g16, g32) < 4e-2, (rel(l16, l32), rel(g16, g32))
    assert rel(l16, l32) > 0  # really two precisions
