"""Every option is checked where it is parsed: one message naming the option and what was expected, exit code 1,
no traceback, nothing written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ectune.cli import main
from ectune.config import RunConfig, from_dict, to_dict

BAD_TRAIN_OPTIONS = [
    (["--objective.q", "1"], "--objective.q 1.0: expected a number > 1"),
    (["--objective.q", "-2"], "--objective.q -2.0: expected a number > 1"),
    (["--ema.beta", "1"], "--ema.beta 1.0: expected a number in [0, 1)"),
    (["--ema.beta", "-0.1"], "--ema.beta -0.1: expected a number in [0, 1)"),
    (["--train.accum", "0"], "--train.accum 0: expected an integer >= 1"),
    (["--train.accum", "3"], "--train.accum 3: expected an integer >= 1 that divides train.batch"),
    (["--objective.stages", "0"], "--objective.stages 0: expected an integer >= 1"),
    (["--net.model-channels", "0"], "--net.model-channels 0: expected an integer in [1, 4096]"),
    (["--net.model-channels", "40000"], "--net.model-channels 40000: expected an integer in [1, 4096]"),
    (["--net.channel-mult"], "--net.channel-mult ()"),
    (["--precond.sigma-data", "0"], "--precond.sigma-data 0.0: expected a number > 0"),
    (["--train.total-kimg", "nan"], "--train.total-kimg nan: expected a finite number > 0"),
    (["--train.total-kimg", "0"], "--train.total-kimg 0.0: expected a finite number > 0"),
    (["--train.total-kimg", "inf"], "--train.total-kimg inf: expected a finite number > 0"),
    (["--train.batch", "0"], "--train.batch 0: expected an integer >= 1"),
    (["--train.seed", str(2**63)], "--train.seed 9223372036854775808: expected an integer in [0, 2**63)"),
    (["--optim.lr", "inf"], "--optim.lr inf: expected a finite number > 0"),
    (["--optim.eps", "0"], "--optim.eps 0.0: expected a number > 0"),
    (["--sample.mid-t", "nan"], "--sample.mid-t (nan,): expected times strictly decreasing inside (0, t_max"),
    (["--sample.mid-t", "1", "2"], "--sample.mid-t (1.0, 2.0): expected times strictly decreasing"),
    (["--sample.mid-t", "90"], "--sample.mid-t (90.0,): expected times strictly decreasing inside (0, t_max = 80.0)"),
    (["--until-kimg", "-1"], "--until-kimg -1.0: expected a number >= 0"),
]


@pytest.mark.parametrize("options, message", BAD_TRAIN_OPTIONS, ids=[o[0] for o, _ in BAD_TRAIN_OPTIONS])
def test_bad_training_option(tmp_path, capsys, options, message):
    run = tmp_path / "run"
    assert main(["tune", "--run", str(run), *options]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    assert main(["pretrain", "--run", str(tmp_path / "run"), "--train.device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda: this machine has no usable CUDA device" in err and not (tmp_path / "run").exists()


def test_stored_config_is_type_checked(tmp_path):
    data = to_dict(RunConfig())
    data["net"]["model_channels"] = "128"
    with pytest.raises(ValueError, match=r"model\.safetensors\.net\.model_channels: expected int, got '128'"):
        from_dict(RunConfig, data, where="model.safetensors")
    data = to_dict(RunConfig())
    data["train"]["batch"] = True  # a bool is not an int here
    with pytest.raises(ValueError, match=r"train\.batch: expected int, got True"):
        from_dict(RunConfig, data)
    data = to_dict(RunConfig())
    data["objective"]["q"] = 0.5
    with pytest.raises(ValueError, match=r"m\.objective: --objective\.q 0\.5: expected a number > 1"):
        from_dict(RunConfig, data, where="m")
    assert from_dict(RunConfig, to_dict(RunConfig())) == RunConfig()


def test_every_preset_is_valid():
    from ectune.presets import PRESETS, get_preset

    for name in PRESETS:
        for mode in ("pretrain", "tune"):
            cfg = get_preset(name, mode)
            assert dataclasses.replace(cfg) == cfg
