"""Every option is checked where it is parsed: one message naming the option and what was expected, exit code 1,
no traceback, nothing written."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

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
    assert main(["pretrain", "--run", str(tmp_path / "run"), "--runtime.device", "cuda"]) == 1
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


# ---------------------------------------------------------------------------------------------- every command


def bad_invocations(tmp: str, model: str) -> list[tuple[list[str], str]]:
    garbage = f"{tmp}/garbage.bin"
    return [
        (["pretrain", "--run", f"{tmp}/r", "--data.source", "idx", "--data.path", f"{tmp}/nope"], f"{tmp}/nope"),
        (["pretrain", "--run", f"{tmp}/r", "--preset", "nope"], "unknown preset 'nope'"),
        (["pretrain", "--dry-run"] + ["--train.batch", "-3"], "--train.batch -3"),
        (["tune", "--run", f"{tmp}/r", "--init", f"{tmp}/nope.safetensors"], f"{tmp}/nope.safetensors"),
        (["tune", "--run", f"{tmp}/r", "--init", garbage], garbage),
        (["sample", f"{tmp}/nope.safetensors", "--out", f"{tmp}/x.png"], f"{tmp}/nope.safetensors"),
        (["sample", garbage, "--out", f"{tmp}/x.png"], garbage),
        (["sample", model, "--n", "0", "--out", f"{tmp}/x.png"], "--n 0"),
        (["sample", model, "--batch", "-1", "--out", f"{tmp}/x.png"], "--batch -1"),
        (["sample", model, "--steps", "2", "--mid-t", "nan", "--out", f"{tmp}/x.png"], "--mid-t nan"),
        (["sample", model, "--seed", str(2**63), "--out", f"{tmp}/x.png"], "--seed"),
        (["sample", model, "--device", "cuda:7", "--out", f"{tmp}/x.png"], "--device cuda:7"),
        (["sample", model, "--device", "gpu", "--out", f"{tmp}/x.png"], "--device 'gpu'"),
        (["info", f"{tmp}/nope"], f"{tmp}/nope"),
        (["info", garbage], garbage),
        (["eval", f"{tmp}/nope.safetensors", "--device", "cpu"], f"{tmp}/nope.safetensors"),
        (["eval", model, "--metric", "nope", "--device", "cpu"], "nope"),
        (["eval", model, "--weights", garbage, "--device", "cpu", "--n", "4"], garbage),
        (["ref-stats", "--data.source", "idx", "--data.path", f"{tmp}/nope", "--device", "cpu"], f"{tmp}/nope"),
        (["ref-stats", "--metric", "nope"], "nope"),
        (["import-edm", f"{tmp}/nope.pkl", "--out", f"{tmp}/o.safetensors"], f"{tmp}/nope.pkl"),
        (["import-edm", garbage, "--out", f"{tmp}/o.safetensors"], garbage),
        (["convert-images", f"{tmp}/nope", f"{tmp}/d.zip"], f"{tmp}/nope"),
        (["convert-images", tmp, f"{tmp}/d.zip", "--resolution", "0"], "resolution=0"),
    ]


def test_no_bad_input_gives_a_traceback(tmp_path, model_file, capsys):
    """Every command, given bad input, exits non-zero with one message naming the file or option; no exception
    escapes `main` (an uncaught one would fail this test with its traceback)."""
    (tmp_path / "garbage.bin").write_bytes(b"\x00garbage\xff" * 100)
    for argv, named in bad_invocations(str(tmp_path), str(model_file)):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse/tyro usage errors: a message and exit code 2, no traceback
            code = exc.code
        err = capsys.readouterr().err
        assert code not in (0, None), argv
        assert named in err and "Traceback" not in err, (argv, err)


def test_retired_fields_of_older_configs_are_ignored():
    data = to_dict(RunConfig())
    data["train"]["num_workers"] = 4  # stored by older versions; it never changed what was trained
    assert from_dict(RunConfig, data) == RunConfig()
    data["train"]["num_wrokers"] = 4
    with pytest.raises(ValueError, match="unknown field.*num_wrokers"):
        from_dict(RunConfig, data)


def test_configs_stored_before_the_runtime_section_load_with_their_settings_moved():
    """An older config kept device, intervals etc. in `train`: they load into `runtime`, values kept."""
    data = to_dict(RunConfig())
    runtime = data.pop("runtime")
    data["train"].update({**runtime, "save_kimg": 7.0, "compile": True})
    cfg = from_dict(RunConfig, data)
    assert cfg.runtime.save_kimg == 7.0 and cfg.runtime.compile is True
    assert cfg.train == RunConfig().train


# The hash that the version before the runtime section gave a training state of the fashion-mnist tune preset of
# that time (computed with that version's RunDir.config_hash): its runs must still resume.
OLD_LAYOUT_STATE_HASH = "d9a67e8c815a6376"


def old_fashion_mnist_tune():
    """That version's fashion-mnist tune preset: unconditional, 32×32 padded, 24 channels, batch 64."""
    from ectune.presets import get_preset

    cfg = get_preset("fashion-mnist", "tune")
    net = replace(cfg.net, img_resolution=32, model_channels=24, attn_resolutions=(8,), label_dim=0)
    return replace(cfg, net=net, data=replace(cfg.data, resolution=32, use_labels=False),
                   optim=replace(cfg.optim, lr=2e-4), train=replace(cfg.train, batch=64))


def test_training_states_saved_with_the_old_config_layout_still_belong_to_their_run():
    from ectune.training.rundir import RunDir

    cfg = old_fashion_mnist_tune()
    assert RunDir.belongs_to(OLD_LAYOUT_STATE_HASH, cfg)
    assert RunDir.belongs_to(RunDir.config_hash(cfg), cfg)
    assert RunDir.config_hash(replace(cfg, runtime=replace(cfg.runtime, save_kimg=1.0))) == RunDir.config_hash(cfg)
    other = replace(cfg, train=replace(cfg.train, seed=1))
    assert not RunDir.belongs_to(OLD_LAYOUT_STATE_HASH, other)
