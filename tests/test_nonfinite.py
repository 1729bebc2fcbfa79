"""No NaN is ever written: a step whose updated weights are non-finite is undone, the EMA skips it, no file is
written with NaN or inf, and NaN files are refused on resume and for sampling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ectune.cli import main
from ectune.runtime import checkpoint
from ectune.runtime.checkpoint import CheckpointError
from ectune.training.guard import DeviceStepGuard, step_unless_nonfinite
from ectune.training import loop
from conftest import needs_fmnist, tiny

OVERFLOW_LR = 3e38  # a finite fp32 learning rate whose update lr·(momentum buffer ≈ 10) overflows to inf


def sgd_after_one_good_step() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([0.5, 0.5, -0.5])
    opt.step()
    p.grad = torch.tensor([10.0, -10.0, 10.0])
    return p, opt


def test_a_step_that_overflows_the_weights_is_undone() -> None:
    p, opt = sgd_after_one_good_step()
    weights = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["lr"] = OVERFLOW_LR
    assert step_unless_nonfinite(opt, [p]) is False
    assert torch.equal(p.detach(), weights)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())  # the momentum buffer too
    opt.param_groups[0]["lr"] = 0.1
    assert step_unless_nonfinite(opt, [p]) is True and not torch.equal(p.detach(), weights)


def test_an_undone_first_step_leaves_no_optimiser_state() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=OVERFLOW_LR, momentum=0.9)
    p.grad = torch.ones(3)
    assert step_unless_nonfinite(opt, [p]) is False
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state.get(p)


def test_device_guard_undoes_an_overflowing_step_on_cpu() -> None:
    p, opt = sgd_after_one_good_step()
    guard = DeviceStepGuard([p])
    guard.zero_grads()
    guard.flat.copy_(torch.tensor([10.0, -10.0, 10.0]))
    weights, buf = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    opt.param_groups[0]["lr"] = OVERFLOW_LR
    assert not bool(guard.step(opt, torch.tensor(1.0)))
    assert torch.equal(p.detach(), weights) and torch.equal(opt.state[p]["momentum_buffer"], buf)


def test_files_with_nan_are_never_written_and_never_used(tmp_path) -> None:
    state = tmp_path / "state.pt"
    checkpoint.save_state(state, {"net": {"w": torch.ones(2)}, "nimg": 1})
    before = state.read_bytes()
    with pytest.raises(CheckpointError, match=r"state\.pt: refusing to write a training state that holds NaN or inf "
                                              r"\(net\.w\)"):
        checkpoint.save_state(state, {"net": {"w": torch.tensor([1.0, float("nan")])}, "nimg": 2})
    assert state.read_bytes() == before
    torch.save({"net": {"w": torch.tensor([float("inf")])}, "nimg": 3}, state)  # written behind ectune's back
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot resume: the training state holds NaN or inf"):
        checkpoint.load_state(state)


@needs_fmnist
def test_training_never_saves_nan_and_names_the_last_save(tmp_path, monkeypatch) -> None:
    cfg = tiny("tune", total_kimg=0.128, max_bad_steps=3)
    run = tmp_path / "run"
    loop.train(cfg, run, until_kimg=0.064, show_progress=False)
    saved = {name: (run / name).read_bytes() for name in ("state.pt", "model.safetensors")}
    ema_before = checkpoint.load_state(run / "state.pt")["ema"]

    real = loop.set_learning_rate

    def overflowing(opt, cfg, nimg):
        real(opt, cfg, nimg)
        for group in opt.param_groups:
            group["lr"] = OVERFLOW_LR
        return OVERFLOW_LR

    monkeypatch.setattr(loop, "set_learning_rate", overflowing)
    with pytest.raises(loop.TrainingError, match="3 consecutive steps had non-finite .*updated weights.*nothing was "
                                                 "saved by this command"):
        loop.train(cfg, run, show_progress=False)
    assert all((run / name).read_bytes() == data for name, data in saved.items())  # nothing overwritten
    state = checkpoint.load_state(run / "state.pt")  # finite, resumable
    assert all(torch.equal(state["ema"][k], v) for k, v in ema_before.items())


def test_sample_refuses_a_model_with_nan_weights(tmp_path, capsys) -> None:
    from dataclasses import replace

    from ectune.config import RunConfig
    from ectune.nets import SMALL_CONFIGS, build_net

    cfg = replace(RunConfig(), net=SMALL_CONFIGS["tiny"])
    good = tmp_path / "good.safetensors"
    checkpoint.save_model(good, build_net(cfg.net).state_dict(), cfg, extra={"objective": "ect"})
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert json.loads(meta["extra"])["objective"] == "ect"
    assert main(["sample", str(bad), "--n", "2", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: refusing to use it: the model holds NaN or inf ({name})" in err
    assert not (tmp_path / "x.png").exists()
