import pytest
import torch
from torch import nn

from ectune.nets.dropout import KeyedDropout, assign_dropout_salts


class TinyNet(nn.Module):
    """A small conv net with the ectune net signature and keyed dropout, for maths tests independent of nets/."""

    def __init__(self, channels: int = 1, width: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Linear(1, width)
        self.drop = KeyedDropout(dropout)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.calls: list[tuple[int, bool]] = []  # (rows, grad enabled) per call
        assign_dropout_salts(self)

    def forward(self, x, c_noise, class_labels=None, *, dropout_key=None):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        h = torch.relu(self.inp(x) + self.emb(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None])
        return self.out(self.drop(h, dropout_key))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: on a 2-core machine shared with other work, 2 OpenMP threads can thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()
