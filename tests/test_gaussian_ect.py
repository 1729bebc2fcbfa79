"""End to end on Gaussian data, where everything is known in closed form: ECT tuning from the ideal denoiser
approaches the exact consistency function, and so the exact 1-step map.

Data x_0 ~ N(0, S²I) with S = σ_data = 0.5. The ideal denoiser is D(x, t) = S²/(S² + t²)·x, which under the EDM
preconditioning f = c_skip·x + c_out·F(c_in·x, c_noise) is exactly F = 0. The PF-ODE solution from x_t to t = 0 is
f*(x, t) = S/√(S² + t²)·x, i.e. F = g*(t)·c_in·x with g*(t) = (√(S² + t²) − S)/t. The network F = g_θ(c_noise)·x
(a small MLP of the noise level times its input) holds both, and starts at the denoiser (g_θ ≡ 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ectune.config import ObjectiveConfig
from ectune.losses import consistency_loss
from ectune.objectives import draw_t_r, loss_spec
from ectune.precond import Precond

S = 0.5


class GainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
        nn.init.zeros_(self.g[-1].weight)  # g ≡ 0: the ideal denoiser of this data
        nn.init.zeros_(self.g[-1].bias)

    def forward(self, x, c_noise, class_labels=None, augment_labels=None, *, dropout_key=None):
        return self.g(c_noise.reshape(-1, 1).float()).reshape(-1, 1, 1, 1) * x


def one_step_gain(f: Precond, t: float) -> float:
    """a(t) with f(x, t) = a(t)·x (the model is linear in x)."""
    with torch.no_grad():
        return float(f(torch.ones(1, 1, 1, 1), torch.tensor([t]))[0, 0, 0, 0])


def exact_gain(t: float) -> float:
    return S / math.sqrt(S * S + t * t)


def test_ect_from_the_ideal_denoiser_learns_the_exact_one_step_map() -> None:
    torch.manual_seed(0)
    f = Precond(GainNet(), sigma_data=S).train()
    # The CIFAR-10 recipe's schedule (q = 2, 8 stages from a pretrained model), shortened.
    obj = ObjectiveConfig(kind="ect", q=2.0, stages=8, weighting="inv_dt", p=0.5, c=0.0)
    kw = loss_spec(obj, data_dim=4, sigma_data=S)
    opt = torch.optim.Adam(f.parameters(), lr=2e-3)
    batch, steps = 512, 2400
    g = torch.Generator().manual_seed(1)
    times = [0.1, 0.5, 2.0, 10.0, 80.0]
    before = {t: one_step_gain(f, t) for t in times}
    for step in range(steps):
        t, r = draw_t_r(obj, n=batch, nimg=step * batch, total_nimg=steps * batch, generator=g)
        x0 = S * torch.randn(batch, 1, 2, 2, generator=g)
        eps = torch.randn(batch, 1, 2, 2, generator=g)
        loss = consistency_loss(f, x0, t, r, eps, dropout_key=torch.zeros(batch, dtype=torch.long), spec=kw)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = {t: one_step_gain(f, t) for t in times}
    for t in times:
        err_before = abs(before[t] / exact_gain(t) - 1)
        err_after = abs(after[t] / exact_gain(t) - 1)
        print(f"t = {t:5}: exact gain {exact_gain(t):.5f}, denoiser {before[t]:.5f} (rel. err {err_before:.3f}), "
              f"tuned {after[t]:.5f} (rel. err {err_after:.4f})")
        assert err_after < 0.05 and err_after < err_before / 5, t
