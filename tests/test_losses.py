import pytest
import torch
from torch import nn

from ectune.losses import Passes, consistency_loss
from ectune.objectives import LossSpec
from ectune.precond import Precond, edm_scalings
from ectune.weighting import adaptive_loss, timestep_weight

from conftest import TinyNet


class DiracOracle(nn.Module):
    """The ideal network for data concentrated at one point a: f(x, t) = a for every t > 0."""

    def __init__(self, a: torch.Tensor, sigma_data: float = 0.5, leak: float = 0.0) -> None:
        super().__init__()
        self.a, self.sd, self.leak = a, sigma_data, leak  # leak > 0: a non-ideal model whose output depends on x

    def forward(self, x_in, c_noise, class_labels=None, *, dropout_key=None):
        t = torch.exp(4 * c_noise.double()).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm_scalings(t, sigma_data=self.sd)
        x = x_in.double() / c_in
        return ((self.a - c_skip * x) / c_out + self.leak * x_in).float()


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.exp(torch.randn(n, generator=g) - 1.0)
    return x0, eps, t


@pytest.mark.parametrize("p, weighting", [(0.5, "inv_dt"), (0.0, "edm"), (0.5, "one")])
def test_ideal_model_has_zero_loss(p, weighting):
    a = torch.rand(1, 1, 8, 8) * 2 - 1
    f = Precond(DiracOracle(a.double()))
    x0 = a.expand(6, -1, -1, -1).clone()
    _, eps, t = batch()
    r = torch.tensor([0.0, 0.5, 0.9, 0.0, 0.99, 0.3]) * t
    loss = consistency_loss(f, x0, t, r, eps, spec=LossSpec(weighting=weighting, p=p, c=0.0))
    assert loss.shape == (6,)
    assert loss.abs().max().item() < 1e-4  # fp32 round-off of the oracle's inversion of the scalings
    wrong = Precond(DiracOracle(a.double(), leak=0.1))
    assert consistency_loss(wrong, x0, t, r, eps, spec=LossSpec(weighting=weighting, p=p, c=0.0)).max().item() > 1e-2


def test_target_pass_has_no_grad_and_matches_manual_stop_gradient(tiny_net):
    f = Precond(tiny_net)
    x0, eps, t = batch()
    r = 0.7 * t
    key = torch.arange(6)
    loss = consistency_loss(f, x0, t, r, eps, dropout_key=key, spec=LossSpec(weighting="inv_dt", p=0.5, c=0.1))
    assert tiny_net.calls == [(6, True), (6, False)]  # the student pass, then one no-grad target pass
    loss.mean().backward()
    g1 = [p.grad.clone() for p in tiny_net.parameters()]
    tiny_net.zero_grad()
    student = f(x0 + t.reshape(-1, 1, 1, 1) * eps, t, dropout_key=key)
    target = f(x0 + r.reshape(-1, 1, 1, 1) * eps, r, dropout_key=key).detach()
    d = (student - target).flatten(1)
    manual = (1 / (t - r)) * ((d.square().sum(1) + 0.01).sqrt() - 0.1)  # pseudo-Huber, c = 0.1
    assert torch.allclose(manual, loss.detach(), rtol=1e-5)
    manual.mean().backward()
    for a, b in zip(g1, tiny_net.parameters()):
        assert torch.allclose(a, b.grad, rtol=1e-4, atol=1e-7)


def test_both_passes_share_the_dropout_mask_even_on_a_subset():
    torch.manual_seed(0)
    net = TinyNet(dropout=0.5).train()
    f = Precond(net)
    x0, eps, t = batch(8)
    # r = t gives identical inputs; only a different dropout mask could make Δ non-zero.
    r = t.clone()
    r[[1, 4, 6]] = 0.0
    loss = consistency_loss(f, x0, t, r, eps, dropout_key=torch.arange(8) * 7 + 3, spec=LossSpec(p=0.0, weighting="one"))
    assert net.calls[1] == (5, False)  # after the student pass, the target pass ran on the 5 rows with r > 0 only
    keep = r > 0
    assert loss[keep].abs().max().item() < 1e-10
    assert (loss[~keep] > 0).all()
    # and the masks really are random: different keys change the student output
    a = f(x0, t, dropout_key=torch.arange(8))
    b = f(x0, t, dropout_key=torch.arange(8) + 100)
    assert not torch.allclose(a, b)


def test_r_zero_rows_equal_the_diffusion_loss_and_skip_the_network(tiny_net):
    f = Precond(tiny_net)
    x0, eps, t = batch()
    key = torch.arange(6)
    r = torch.zeros(6)
    diff = consistency_loss(f, x0, t, r, eps, dropout_key=key, spec=LossSpec(weighting="edm", p=0.0))
    assert tiny_net.calls == [(6, True)]  # no target pass at all
    with torch.no_grad():
        D = f(x0 + t.reshape(-1, 1, 1, 1) * eps, t, dropout_key=key)
    edm = (t**2 + 0.25) / (t * 0.5) ** 2 * (D - x0).flatten(1).square().sum(1)
    assert torch.allclose(diff.detach(), edm, rtol=1e-5)
    mixed_r = torch.tensor([0.0, 0.3, 0.0, 0.5, 0.0, 0.1]) * t
    mixed = consistency_loss(f, x0, t, mixed_r, eps, dropout_key=key, spec=LossSpec(weighting="edm", p=0.0))
    zero = mixed_r == 0
    assert torch.allclose(mixed.detach()[zero], diff.detach()[zero], rtol=1e-6)


def test_row_multiple_pads_with_discarded_rows(tiny_net):
    f = Precond(tiny_net)
    x0, eps, t = batch(8)
    r = torch.zeros(8)
    r[[2, 5, 7]] = 0.5 * t[[2, 5, 7]]
    key = torch.arange(8)
    plain = consistency_loss(f, x0, t, r, eps, dropout_key=key)
    padded = consistency_loss(Passes(f, f, 4), x0, t, r, eps, dropout_key=key)
    assert tiny_net.calls[1] == (3, False) and tiny_net.calls[3] == (4, False)  # each after its student pass
    assert torch.allclose(plain, padded, rtol=1e-6)


def test_keyed_dropout_fast_path_matches_int64_reference_and_is_uniform():
    from ectune.nets.dropout import keyed_uniform, keyed_uniform_reference

    key = torch.tensor([0, 1, 2**31 - 2, 123456789])
    shape = torch.Size([4, 3, 17, 5])  # odd elements per row: the last hash gives one draw
    fast = keyed_uniform(key, 7, shape, device=torch.device("cpu"))
    assert torch.equal(fast, keyed_uniform_reference(key, 7, shape))
    u = keyed_uniform(torch.arange(256), 1, torch.Size([256, 4096]), device=torch.device("cpu"))
    assert abs(u.mean().item() - 0.5) < 1e-3 and abs(u.std().item() - 12**-0.5) < 1e-3
    assert abs(torch.corrcoef(torch.stack([u[:, 0::2].flatten(), u[:, 1::2].flatten()]))[0, 1].item()) < 0.01
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(keyed_uniform(key, 8, shape, device=torch.device("cpu")), fast)  # salt matters


def test_keyed_draws_are_the_same_from_the_int16_view_and_from_the_traced_path(monkeypatch):
    """Eager mode reads two draws per hash through an int16 view; traced graphs compute each element's draw from its
    index (hash j // 2, half j % 2). Same numbers."""
    from ectune.nets.dropout import keyed_int16

    key, cpu = torch.tensor([5, 2**31 - 2, 0]), torch.device("cpu")
    for shape in (torch.Size([3, 2, 5, 7]), torch.Size([3, 4, 8, 8])):
        viewed = keyed_int16(key, 11, shape, device=cpu)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        traced = keyed_int16(key, 11, shape, device=cpu)
        monkeypatch.undo()
        assert viewed.dtype == traced.dtype == torch.int16 and torch.equal(viewed, traced)


def test_keyed_dropout_keeps_its_exact_probability_and_expectation():
    from ectune.nets.dropout import KeyedDropout, drop_threshold

    threshold, keep_prob = drop_threshold(0.2)
    assert threshold == 13108 - 32768 and keep_prob == (65536 - 13108) / 65536  # ⌈0.2·2¹⁶⌉ = 13108
    layer = KeyedDropout(0.2).train()
    y = layer(torch.ones(512, 64, 32), torch.arange(512))
    kept = (y > 0).float().mean().item()
    assert abs(kept - keep_prob) < 3e-3  # 1M draws: the standard error is 4e-4
    values = y.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / keep_prob, rel=1e-7)


def test_keyed_keep_mask_is_exactly_uniform_at_least_p():
    """The integer keep-mask must equal `u >= p` for every p, including p equal to (or one ulp off) a drawn u."""
    from ectune.nets.dropout import drop_threshold, keyed_int16, keyed_uniform_reference

    key, shape, cpu = torch.tensor([0, 9, 2**31 - 2]), torch.Size([3, 2, 11, 7]), torch.device("cpu")
    draws = keyed_int16(key, 3, shape, device=cpu)
    grid = torch.arange(65536, dtype=torch.float32) / 65536
    u = keyed_uniform_reference(key, 3, shape)
    drawn = u.flatten()[:40]
    ps = [0.0, 1e-7, 0.1, 0.13, 0.2, 1 / 3, 0.5, 0.999, 1 - 2**-24, 1 - 1e-9]
    ps += drawn.tolist() + torch.nextafter(drawn, torch.zeros(())).tolist() + torch.nextafter(drawn, torch.ones(())).tolist()
    for p in ps:
        threshold, keep_prob = drop_threshold(p)
        keep = draws >= threshold if threshold <= 32767 else torch.zeros(shape, dtype=torch.bool)  # p rounds to 1
        assert torch.equal(keep, u >= p), p
        assert keep_prob == int((grid >= p).sum()) / 65536  # the share of 16-bit uniforms that pass u >= p


def test_keyed_dropout_compiles_to_the_same_numbers():
    """torch.compile (inductor, here its CPU backend) must reproduce the eager/int64 masks bit for bit."""
    from ectune.nets.dropout import KeyedDropout, keyed_uniform, keyed_uniform_reference

    key = torch.tensor([3, 2**31 - 2, 77])
    shape = torch.Size([3, 64, 16, 16])
    compiled = torch.compile(keyed_uniform, dynamic=False)(key, 5, shape, device=torch.device("cpu"))
    assert torch.equal(compiled, keyed_uniform_reference(key, 5, shape))
    layer = KeyedDropout(0.2).train()
    layer.salt = 5
    x = torch.randn(shape)
    eager = layer(x, key)
    assert torch.equal(torch.compile(layer, dynamic=False, fullgraph=True)(x, key), eager)
    assert torch.equal(eager != 0, keyed_uniform_reference(key, 5, shape) >= 0.2)
    dynamic = torch.compile(layer, dynamic=True, fullgraph=True)  # the target pass's batch size varies
    for rows in ([0, 2], [1]):
        assert torch.equal(dynamic(x[rows], key[rows]), eager[rows])  # a row's mask is the same in any sub-batch


class ToyDelta:
    """A denoiser whose student pass returns target + δ (δ a leaf tensor) and whose no-grad target pass returns the
    target, so consistency_loss sees exactly Δ = δ and autograd gives the per-sample loss's gradient w.r.t. Δ."""

    def __init__(self, target: torch.Tensor, delta: torch.Tensor) -> None:
        self.target, self.delta = target, delta

    def __call__(self, x, sigma, class_labels=None, *, dropout_key=None):
        return self.target + self.delta if torch.is_grad_enabled() else self.target.clone()


def _toy_loss(loss_form="pseudo_huber", **kw):
    """(per-sample loss, dL/dΔ, Δ in float64, t, r) for a toy Δ with rows of very different norms."""
    g = torch.Generator().manual_seed(3)
    n = 4
    delta = (torch.randn(n, 1, 4, 4, generator=g) * torch.tensor([1e-3, 0.05, 0.3, 2.0]).reshape(-1, 1, 1, 1))
    delta.requires_grad_(True)
    target = torch.zeros(n, 1, 4, 4)  # so that the student's output target + δ is δ exactly, with no fp32 rounding
    x0, eps = torch.zeros(n, 1, 4, 4), torch.randn(n, 1, 4, 4, generator=g)
    t = torch.tensor([0.3, 1.0, 2.5, 40.0])
    r = torch.tensor([0.2, 0.9, 1.0, 39.5])  # all r > 0: every row's target comes from the (no-grad) target pass
    loss = consistency_loss(ToyDelta(target, delta), x0, t, r, eps, dropout_key=torch.arange(n), spec=LossSpec(form=loss_form, **kw))
    (grad,) = torch.autograd.grad(loss.sum(), delta)
    return loss.detach().double(), grad.double(), delta.detach().double(), t.double(), r.double()


@pytest.mark.parametrize("c", [0.0, 0.03, 0.06])
def test_default_loss_is_the_pseudo_huber_of_the_reference(c):
    """p = 1/2: value w̄·(√(‖Δ‖²+c²) − c) and gradient w̄·Δ/√(‖Δ‖²+c²) (REFERENCE §3 step 5), not twice it."""
    loss, grad, d, t, r = _toy_loss(weighting="inv_dt", p=0.5, c=c)
    w_bar = 1 / (t - r)
    sq = d.flatten(1).square().sum(1)
    assert torch.allclose(loss, w_bar * ((sq + c * c).sqrt() - c), rtol=1e-5, atol=0)
    hand = w_bar.reshape(-1, 1, 1, 1) * d / (sq + c * c).sqrt().reshape(-1, 1, 1, 1)
    assert torch.allclose(grad, hand, rtol=1e-5, atol=1e-7)


def test_p0_edm_pretraining_loss_is_the_squared_l2():
    """p = 0 with EDM's weighting stays EDM's loss λ(t)·‖Δ‖², gradient 2·λ(t)·Δ, whatever the loss form."""
    for form in ("pseudo_huber", "weighted_l2"):
        loss, grad, d, t, r = _toy_loss(weighting="edm", p=0.0, c=0.0, loss_form=form)
        lam = (t**2 + 0.25) / (t * 0.5) ** 2
        assert torch.allclose(loss, lam * d.flatten(1).square().sum(1), rtol=1e-5, atol=0)
        assert torch.allclose(grad, 2 * lam.reshape(-1, 1, 1, 1) * d, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p, metric", [(0.25, "l2"), (1.0, "l2"), (0.5, "l1")])
def test_other_adaptive_weightings_have_the_eq20_gradient(p, metric):
    """Other p and the L1 weighting of Tab. 4: gradient w̄·w(Δ)·Δ (Eq. 20), value w̄·w(Δ)·½‖Δ‖²."""
    c = 0.1
    loss, grad, d, t, r = _toy_loss(weighting="inv_t", p=p, c=c, metric=metric)
    w_bar = 1 / t
    flat = d.flatten(1)
    w = 1 / (flat.abs().sum(1) + c) if metric == "l1" else 1 / (flat.square().sum(1) + c * c) ** p
    assert torch.allclose(loss, w_bar * w * 0.5 * flat.square().sum(1), rtol=1e-5, atol=0)
    assert torch.allclose(grad, (w_bar * w).reshape(-1, 1, 1, 1) * d, rtol=1e-5, atol=1e-7)


def test_weighted_l2_form_keeps_twice_the_gradient():
    """The explicit option loss_form='weighted_l2': w̄·sg[w(Δ)]·‖Δ‖², gradient 2·w̄·Δ/√(‖Δ‖²+c²)."""
    c = 0.06
    loss, grad, d, t, r = _toy_loss(weighting="inv_dt", p=0.5, c=c, loss_form="weighted_l2")
    w_bar = 1 / (t - r)
    sq = d.flatten(1).square().sum(1)
    assert torch.allclose(loss, w_bar * sq / (sq + c * c).sqrt(), rtol=1e-5, atol=0)
    assert torch.allclose(grad, 2 * (w_bar / (sq + c * c).sqrt()).reshape(-1, 1, 1, 1) * d, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown loss form"):
        _toy_loss(weighting="inv_dt", p=0.5, c=c, loss_form="huber")


def test_objectives_default_to_the_reference_scale_and_old_configs_keep_theirs():
    """Every preset trains with the pseudo-Huber form; a stored config written without the field (a run that
    trained with w̄·sg[w]·‖Δ‖²) reads back as weighted_l2, so resuming it cannot silently change its gradient."""
    from ectune.config import RunConfig, from_dict, to_dict
    from ectune.objectives import loss_spec
    from ectune.presets import get_preset, preset_names

    for name in preset_names():
        for mode in ("pretrain", "tune"):
            cfg = get_preset(name, mode)
            assert loss_spec(cfg.objective, data_dim=3, sigma_data=0.5).form == "pseudo_huber"
    stored = to_dict(RunConfig())
    assert from_dict(RunConfig, stored).objective.loss_form == "pseudo_huber"
    del stored["objective"]["loss_form"]
    assert from_dict(RunConfig, stored).objective.loss_form == "weighted_l2"


@pytest.mark.parametrize("r_zero_rows", [0, 3])
def test_target_pass_replays_the_student_masks_bit_for_bit(monkeypatch, r_zero_rows):
    """The target pass takes rows of the student pass's dropout masks instead of hashing: the loss equals, bit for
    bit, one whose target pass hashes its own masks (a separate call, no tape), and no layer hashes twice."""
    import dataclasses

    from ectune.nets import SMALL_CONFIGS, build_net
    from ectune.nets import dropout as dropout_module

    torch.manual_seed(0)
    net = build_net(dataclasses.replace(SMALL_CONFIGS["tiny"], dropout=0.3, dropout_res=1 << 30)).train()
    f = Precond(net)
    n = 6
    x0, eps = torch.randn(n, 1, 32, 32), torch.randn(n, 1, 32, 32)
    t = torch.linspace(0.2, 3.0, n)
    r = 0.9 * t
    r[:r_zero_rows] = 0
    key = torch.arange(100, 100 + n)
    hashes = []
    real = dropout_module.keyed_int16
    monkeypatch.setattr(dropout_module, "keyed_int16", lambda *a, **k: hashes.append(1) or real(*a, **k))
    loss = consistency_loss(f, x0, t, r, eps, dropout_key=key, spec=LossSpec(weighting="inv_dt", p=0.5, c=0.0))
    layers = sum(1 for m in net.modules() if isinstance(m, dropout_module.KeyedDropout))
    assert len(hashes) == layers  # the student pass only
    rows = slice(r_zero_rows, n)
    with torch.no_grad():
        target = f(x0[rows] + r[rows].reshape(-1, 1, 1, 1) * eps[rows], r[rows], dropout_key=key[rows])
    target = torch.cat([x0[:r_zero_rows], target])
    student = f(x0 + t.reshape(-1, 1, 1, 1) * eps, t, dropout_key=key)
    manual = timestep_weight("inv_dt", t, r) * adaptive_loss(student - target, p=0.5, c=0.0)  # the same operations
    assert torch.equal(loss.detach(), manual.detach())
