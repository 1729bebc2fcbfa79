"""EDM/EDM2 pickle import: synthetic pickles laid out like the public ones, loaded without running their code.

The fixtures write throw-away `torch_utils.persistence`, `dnnlib.util` and `training.loss` modules, pickle a tiny
ectune network wrapped the way EDM's persistent classes pickle themselves (source code embedded, state = module
__dict__), then remove those modules from sys.modules and sys.path before loading, as on a machine without EDM's
code.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ectune.config import NetConfig
from ectune.importers import PickleRefused, import_edm_pickle, load_edm_pickle, map_to_ectune, read_edm_pickle
from ectune.importers.edm_pickle import MethodRef, _RestrictedUnpickler
from ectune.nets import SMALL_CONFIGS, build_net

from conftest import FAKE_MODULE_NAMES, SystemCall, booby_trap, randomised, write_pickle


@pytest.mark.parametrize("protocol", [2, 4])
def test_edm_ddpmpp_pickle_round_trip(tmp_path: Path, fake_edm: Any, protocol: int) -> None:
    cfg = dataclasses.replace(SMALL_CONFIGS["tiny"], img_channels=3, augment_dim=9, label_dim=10, dropout=0.0)
    net = randomised(cfg)
    src, marker = booby_trap(tmp_path)
    path = tmp_path / "network-snapshot.pkl"
    init_kwargs = dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", dropout=0.13,
                       embedding_type="positional", encoder_type="standard", decoder_type="standard", augment_dim=9)
    write_pickle(path, fake_edm, net, "edm", init_kwargs, protocol, src)
    sys.modules.pop("torch_utils.persistence")  # loading must not need (or import) EDM's code
    sys.modules.pop("torch_utils")

    state = load_edm_pickle(path)
    assert all(k.startswith("model.") for k in state)
    assert "model.enc.16x16_down.conv0.resample_filter" in state
    pkl = read_edm_pickle(path)
    assert pkl.class_name == "EDMPrecond" and pkl.init_kwargs["dropout"] == 0.13

    new_cfg, sd = import_edm_pickle(path)
    assert new_cfg == dataclasses.replace(cfg, dropout=0.13)
    new_net = build_net(new_cfg).eval()
    new_net.load_state_dict(sd)
    x, c_noise = torch.randn(2, 3, 32, 32), torch.randn(2)
    labels = torch.eye(10)[:2]
    with torch.no_grad():
        torch.testing.assert_close(new_net(x, c_noise, labels), net(x, c_noise, labels))
    assert not marker.exists()
    assert "torch_utils.persistence" not in sys.modules


def test_edm2_pickle_round_trip(tmp_path: Path, fake_edm: Any) -> None:
    # 32 base channels: the 64-channel 8×8 level has one attention head (EDM2: 64 channels per head).
    cfg = dataclasses.replace(SMALL_CONFIGS["tiny-edm2"], img_channels=3, label_dim=10, dropout=0.0,
                              dropout_res=NetConfig().dropout_res, model_channels=32)
    net = randomised(cfg)
    src, marker = booby_trap(tmp_path)
    path = tmp_path / "edm2-img64-xs.pkl"
    write_pickle(path, fake_edm, net, "edm2", dict(model_channels=32, dropout=0.1), 4, src)

    state = load_edm_pickle(path)
    assert "unet.out_gain" in state and "logvar_linear.weight" in state
    new_cfg, sd = import_edm_pickle(path)  # kind guessed from the 'unet.' prefix; logvar head dropped
    assert new_cfg == dataclasses.replace(cfg, dropout=0.1)
    assert not any(k.startswith("logvar") for k in sd)
    new_net = build_net(new_cfg).eval()
    new_net.load_state_dict(sd)
    x, c_noise = torch.randn(2, 3, 32, 32), torch.randn(2)
    with torch.no_grad():
        torch.testing.assert_close(new_net(x, c_noise, torch.eye(10)[:2]), net(x, c_noise, torch.eye(10)[:2]))
    assert not marker.exists()


def test_edm2_model_channels_inferred_from_shapes_without_kwargs(tmp_path: Path, fake_edm: Any) -> None:
    # 16·(1, 2, 4): the 64-channel 8×8 level has one attention head, which the inference must find.
    cfg = dataclasses.replace(SMALL_CONFIGS["tiny-edm2"], channel_mult=(1, 2, 4), dropout=0.0,
                              dropout_res=NetConfig().dropout_res)
    write_pickle(tmp_path / "n.pkl", fake_edm, randomised(cfg), "edm2", {}, 4, "")
    new_cfg, _ = map_to_ectune(load_edm_pickle(tmp_path / "n.pkl"), "edm2")
    assert new_cfg == cfg


@pytest.mark.parametrize("loss_class", ["PersistentLoss", "PlainLoss"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_ect_snapshot_loss_with_a_bound_method(tmp_path: Path, fake_edm: Any, loss_class: str, protocol: int) -> None:
    import training.loss

    net = randomised(SMALL_CONFIGS["tiny"])
    src, marker = booby_trap(tmp_path)
    ect, edm = tmp_path / "network-snapshot-000100.pkl", tmp_path / "edm.pkl"
    write_pickle(ect, fake_edm, net, "edm", {}, protocol, src, loss_fn=getattr(training.loss, loss_class)(src))
    write_pickle(edm, fake_edm, net, "edm", {}, protocol, src)
    assert b"getattr" in ect.read_bytes()  # the bound method really is pickled as builtins.getattr(loss, 't_to_r')
    for name in FAKE_MODULE_NAMES:
        sys.modules.pop(name, None)

    (cfg, sd), (edm_cfg, edm_sd) = import_edm_pickle(ect), import_edm_pickle(edm)
    assert cfg == edm_cfg and sd.keys() == edm_sd.keys() and all(torch.equal(sd[k], edm_sd[k]) for k in sd)
    with ect.open("rb") as f:
        loss = _RestrictedUnpickler(f).load()["loss_fn"]
    owner = "ECTLoss" if loss_class == "PersistentLoss" else "training.loss.PlainLoss"
    assert loss.__dict__["state"]["mapping_fn"] == MethodRef(owner, "t_to_r")  # names only, as data
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- refusals


class _Eval:
    def __reduce__(self) -> Any:
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_reduce_is_refused_and_never_run(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    with path.open("wb") as f:
        pickle.dump({"ema": SystemCall(f"touch {marker}")}, f, protocol=protocol)
    with pytest.raises(PickleRefused, match=r"refusing to load global (posix|nt|os)\.system"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_malicious_payload_nested_in_network_state_is_refused(tmp_path: Path, fake_edm: Any) -> None:
    marker = tmp_path / "PWNED"
    net = build_net(SMALL_CONFIGS["tiny"])
    path = tmp_path / "evil-net.pkl"
    write_pickle(path, fake_edm, net, "edm", {"dropout": SystemCall(f"touch {marker}")}, 4, "")
    with pytest.raises(PickleRefused, match="system"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "eval.pkl"
    path.write_bytes(pickle.dumps({"ema": _Eval()}))
    with pytest.raises(PickleRefused, match="builtins.eval"):
        load_edm_pickle(path)


def _getattr(obj: bytes, name: str) -> bytes:
    """Protocol-0 opcodes for builtins.getattr(obj, name)."""
    return b"cbuiltins\ngetattr\n(" + obj + b"V" + name.encode() + b"\ntR"


def _call(fn: bytes, arg: str) -> bytes:
    """Protocol-0 opcodes for fn(arg)."""
    return fn + b"(V" + arg.encode() + b"\ntR"


def _os_via_getattr() -> bytes:
    """os, reached with the real getattr from whitelisted names only: set.__globals__['__builtins__']['__import__']."""
    builtins_dict = _call(_getattr(_getattr(b"cbuiltins\nset\n", "__globals__"), "get"), "__builtins__")
    return _call(_call(_getattr(builtins_dict, "get"), "__import__"), "os")


@pytest.mark.parametrize("os_module, refusal", [
    (_os_via_getattr(), r"refusing to call MethodRef\.get"),  # the first call of a method reference
    (_call(b"cbuiltins\n__import__\n", "os"), r"refusing to load global builtins\.__import__"),
], ids=["set.__globals__-chain", "builtins.__import__"])
def test_getattr_reaches_no_real_function(tmp_path: Path, os_module: bytes, refusal: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "getattr.pkl"
    path.write_bytes(b"(Vema\n" + _call(_getattr(os_module, "system"), f"touch {marker}") + b"d.")
    with pytest.raises(PickleRefused, match=refusal):
        load_edm_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("args", [b"V__globals__\nI0\n", b"I1\n", b""], ids=["default", "int-name", "no-name"])
def test_getattr_other_than_a_bound_method_is_refused(tmp_path: Path, args: bytes) -> None:
    path = tmp_path / "getattr.pkl"
    path.write_bytes(b"(Vema\ncbuiltins\ngetattr\n(cbuiltins\nset\n" + args + b"tRd.")
    with pytest.raises(PickleRefused, match=r"builtins\.getattr is only allowed as \(object, attribute name\)"):
        load_edm_pickle(path)


def test_not_an_edm_pickle_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"G_ema": 1}))
    with pytest.raises(ValueError, match="key 'ema'"):
        load_edm_pickle(path)


# ---------------------------------------------------------------------------------------------- key checking


def test_mismatch_error_lists_missing_unexpected_and_shapes() -> None:
    cfg = SMALL_CONFIGS["tiny"]
    sd = {f"model.{k}": v for k, v in build_net(cfg).state_dict().items()}
    del sd["model.dec.32x32_aux_conv.bias"]
    sd["model.enc.32x32_block0.extra.weight"] = torch.zeros(3)
    sd["model.dec.8x8_in1.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError) as err:
        map_to_ectune(sd, "edm")
    msg = str(err.value)
    assert "missing: dec.32x32_aux_conv.bias" in msg
    assert "unexpected: enc.32x32_block0.extra.weight" in msg
    assert "shape mismatch: dec.8x8_in1.conv1.weight: (1, 1, 3, 3) in file vs (32, 32, 3, 3) expected" in msg


def test_unprefixed_state_is_accepted() -> None:
    net = build_net(SMALL_CONFIGS["tiny"])
    cfg, sd = map_to_ectune(net.state_dict(), "edm")
    assert cfg == dataclasses.replace(SMALL_CONFIGS["tiny"], dropout=0.0)
    assert sd.keys() == net.state_dict().keys()
