import pytest
import torch
from torch import nn

from ectune.config import EMAConfig
from ectune.ema import EMA, ema_betas, halflife_beta, power_beta, power_gamma


def test_power_gamma_inverts_sigma_rel():
    for s in (0.01, 0.05, 0.10):
        g = power_gamma(s)
        assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(s, rel=1e-9)
    assert power_gamma(0.10) == pytest.approx(6.94, abs=0.01)  # EDM2: σ_rel=0.10 ↔ γ≈6.94
    assert power_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # σ_rel=0.05 ↔ γ≈16.97
    with pytest.raises(ValueError):
        power_gamma(0.5)


def test_betas():
    assert halflife_beta(128, 128) == 0.5
    assert halflife_beta(64, 128) ** 2 == pytest.approx(0.5)
    assert power_beta(1280, 128, 2.0) == pytest.approx(0.9**3)
    assert ema_betas(EMAConfig(kind="fixed", beta=0.9993), nimg=1, batch=1) == [0.9993]
    assert len(ema_betas(EMAConfig(kind="power", sigma_rels=(0.01, 0.05, 0.1)), nimg=1e6, batch=128)) == 3


def test_ema_update_matches_manual_average():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = EMA(net, EMAConfig(kind="fixed", beta=0.9))
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, nimg=10, batch=10)
    assert torch.allclose(ema.state_dict()["weight"], 0.9 * w0 + 0.1 * (w0 + 1))
    clone = EMA(net, EMAConfig(kind="fixed", beta=0.9))
    clone.load_state(ema.to_state())
    assert torch.equal(clone.state_dict()["weight"], ema.state_dict()["weight"])
    nn.Linear(3, 2).load_state_dict(ema.state_dict())
