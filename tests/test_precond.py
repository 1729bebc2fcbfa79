import pytest
import torch
from torch import nn

from ectune.precond import Precond, edm_scalings


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
