import pytest
import torch

from ectune.weighting import TIMESTEP_WEIGHTINGS, adaptive_weight, timestep_weight

T, R, SD = 2.0, 1.5, 0.5


@pytest.mark.parametrize(
    "name, value",
    [
        ("one", 1.0), ("inv_t", 1 / T), ("inv_dt", 1 / (T - R)), ("inv_t_plus_inv_sigma_data", 1 / T + 1 / SD),
        ("inv_t2", 1 / T**2), ("inv_t2_plus_1", 1 / T**2 + 1), ("inv_t2_plus_inv_sigma_data2", 1 / T**2 + 1 / SD**2),
        ("inv_t2_plus_sigma_data2", 1 / (T**2 + SD**2)), ("edm", (T**2 + SD**2) / (T * SD) ** 2),
    ],
)
def test_timestep_weightings(name, value):
    w = timestep_weight(name, torch.tensor([T], dtype=torch.float64), torch.tensor([R], dtype=torch.float64), sigma_data=SD)
    assert w.item() == pytest.approx(value, rel=1e-12)


def test_all_eight_table3_weightings_exist():
    assert len(set(TIMESTEP_WEIGHTINGS) - {"edm"}) == 8
    with pytest.raises(ValueError, match="unknown timestep weighting"):
        timestep_weight("snr", torch.ones(1), torch.zeros(1))


def test_adaptive_weight_values_and_no_grad():
    delta = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    w = adaptive_weight(delta, p=0.5, c=0.0)
    assert w[0].item() == pytest.approx(1 / 5)
    assert torch.isfinite(w).all()
    assert not w.requires_grad
    assert adaptive_weight(delta, p=0.5, c=1.0)[0].item() == pytest.approx(1 / (26**0.5))
    assert adaptive_weight(delta, p=0.0, c=1.0).tolist() == [1.0, 1.0]
    assert adaptive_weight(delta, p=1.0, c=0.0)[0].item() == pytest.approx(1 / 25)
    assert adaptive_weight(delta, p=0.5, c=0.5, metric="l1")[0].item() == pytest.approx(1 / 7.5)


def test_p_half_gives_twice_the_pseudo_huber_gradient():
    torch.manual_seed(0)
    x = torch.randn(4, 10, requires_grad=True)
    y = torch.randn(4, 10)
    c = 0.3
    ours = (adaptive_weight(x - y, p=0.5, c=c) * (x - y).square().sum(1)).sum()
    (g_ours,) = torch.autograd.grad(ours, x)
    huber = (((x - y).square().sum(1) + c**2).sqrt() - c).sum()
    (g_huber,) = torch.autograd.grad(huber, x)
    assert torch.allclose(g_ours, 2 * g_huber, atol=1e-6)
