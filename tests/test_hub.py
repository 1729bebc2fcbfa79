"""The Hub-style export (`ectune export`), its model card and licence, `hf://` references resolved through a local
hub cache, and `ectune push`'s upload call: all offline."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import randomised
from ectune.cli import main
from ectune.config import RunConfig, to_dict
from ectune.hub.refs import HubError, HubRef, parse_hub_ref
from ectune.model import load_model, sample_images
from ectune.nets import SMALL_CONFIGS
from ectune.runtime.checkpoint import read_model_meta, save_model

yaml = pytest.importorskip("yaml")  # huggingface_hub's dependency; the card is checked with a real YAML parser

NET = replace(SMALL_CONFIGS["tiny"], img_resolution=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
              dropout=0.0)


def tiny_cfg(**net) -> RunConfig:
    return replace(RunConfig(), net=replace(NET, **net))


def write_model(path: Path, cfg: RunConfig, extra: dict) -> Path:
    save_model(path, randomised(cfg.net).state_dict(), cfg, extra=extra)
    return path


def write_run(run: Path, cfg: RunConfig, *, init: str | None, command: str = "tune") -> Path:
    """A run directory as training leaves it: model, run record, one training evaluation, one `ectune eval`."""
    run.mkdir(parents=True)
    write_model(run / "model.safetensors", cfg, {"nimg": 4096, "objective": cfg.objective.kind})
    (run / "config.json").write_text(json.dumps({"command": command, "init": init, "config": to_dict(cfg)}))
    (run / "stats.jsonl").write_text(
        json.dumps({"kimg": 2.048, "loss": 0.5}) + "\n"
        + json.dumps({"kimg": 4.096, "metric_name": "FD-Lite0", "metric_value": 91.5, "metric_sampler": "1step",
                      "eval_n": 500, "fd_1step": 91.5, "fd_2step": 60.25}) + "\n")
    (run / "eval-lite0.json").write_text(json.dumps({
        "metric": "lite0", "metric_name": "FD-Lite0", "n": 300, "seed": 0, "seeds": [0, 299], "nimg": 4096,
        "kimg": 4.096, "results": [{"method": "consistency", "label": "1step", "steps": 1, "nfe": 1, "mid_t": None,
                                    "fd": 176.1},
                                   {"method": "consistency", "label": "2step", "steps": 2, "nfe": 2, "mid_t": [0.821],
                                    "fd": 104.9}],
        "reference": {"data": "Fashion-MNIST", "split": "train", "count": 1000}}))
    return run


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_hub_refs_parse_and_refuse():
    assert parse_hub_ref("hf://me/tiny") == HubRef("me/tiny")
    assert parse_hub_ref("hf://me/tiny@v1.0") == HubRef("me/tiny", "v1.0")
    assert parse_hub_ref(Path("hf://me/tiny@main")) == HubRef("me/tiny", "main")  # a Path drops one slash
    assert parse_hub_ref("runs/fm-ecm") is None and parse_hub_ref("hfruns/x") is None
    for bad in ("hf://", "hf://@main", "hf://me/tiny@", "hf://me/tiny/extra", "hf://me/ti ny"):
        with pytest.raises(HubError, match="expected hf://OWNER/NAME"):
            parse_hub_ref(bad)


def test_export_card_and_identical_samples(tmp_path, capsys):
    run = write_run(tmp_path / "runs" / "fm-ecm", tiny_cfg(), init=None, command="pretrain")
    dest = tmp_path / "out" / "fm-ecm-hub"
    assert main(["export", str(run), str(dest), "--repo", "me/fm-ecm"]) == 0
    assert "licence mit, 4 recorded measurement(s)" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    # The folder is a model for ectune: same network, same weights, same samples.
    a_model, a_cfg, _ = load_model(run)
    b_model, b_cfg, b_extra = load_model(dest)
    seeds = torch.tensor([5, 6])
    assert torch.equal(sample_images(a_model, a_cfg, seeds, steps=2), sample_images(b_model, b_cfg, seeds, steps=2))
    assert b_extra["license"] == "mit" and b_extra["nimg"] == 4096

    meta = front_matter(dest / "README.md")
    assert meta["library_name"] == "ectune" and meta["pipeline_tag"] == "unconditional-image-generation"
    assert meta["license"] == "mit" and meta["datasets"] == ["fashion_mnist"]
    assert meta["sampler"] == {"method": "consistency", "steps": 2, "t_max": 80.0, "mid_t": [0.821], "sigma_min_shift": 0.0}
    metrics = [r["metrics"][0] for r in meta["model-index"][0]["results"]]
    got = {(m["args"]["source"].split()[0], m["args"]["steps"], m["args"]["n_samples"]): m["value"] for m in metrics}
    assert got == {("eval-lite0.json", 1, 300): 176.1, ("eval-lite0.json", 2, 300): 104.9,
                   ("stats.jsonl", 1, 500): 91.5, ("stats.jsonl", 2, 500): 60.25}
    assert all(m["type"] == "fd-lite0" for m in metrics)
    assert metrics[1]["args"]["mid_t"] == [0.821] and metrics[0]["args"]["seeds"] == [0, 299]
    body = (dest / "README.md").read_text()
    assert "ectune sample hf://me/fm-ecm --steps 2 --mid-t 0.821" in body and "**MIT**" in body

    config = json.loads((dest / "config.json").read_text())
    assert config["library_name"] == "ectune" and config["label_dim"] == 0 and config["img_resolution"] == 8
    assert config["config"] == to_dict(a_cfg)


def test_licence_follows_the_init_chain(tmp_path, capsys):
    imported = write_model(tmp_path / "edm-cifar10.safetensors", tiny_cfg(label_dim=3),
                           {"nimg": 0, "objective": "diffusion", "imported_from": "edm-cifar10-32x32-cond-vp.pkl",
                            "kind": "edm", "preset": "cifar10"})
    tuned = write_run(tmp_path / "ecm", tiny_cfg(label_dim=3), init=str(imported))
    assert main(["export", str(tuned), str(tmp_path / "hub1")]) == 0
    meta = front_matter(tmp_path / "hub1" / "README.md")
    assert meta["license"] == "cc-by-nc-sa-4.0" and "class-conditional" in meta["tags"]
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    body = (tmp_path / "hub1" / "README.md").read_text()
    assert "CC BY-NC-SA 4.0" in body and "edm-cifar10-32x32-cond-vp.pkl" in body

    # Tuned again from the exported folder: the licence stamped into its weights carries over.
    again = write_run(tmp_path / "ecm2", tiny_cfg(label_dim=3), init=str(tmp_path / "hub1"))
    assert main(["export", str(again), str(tmp_path / "hub2")]) == 0
    assert front_matter(tmp_path / "hub2" / "README.md")["license"] == "cc-by-nc-sa-4.0"
    # Relabelling non-commercial weights MIT is refused; a lone file needs --license; a lost --init too.
    capsys.readouterr()
    assert main(["export", str(again), str(tmp_path / "hub3"), "--license", "mit"]) == 1
    assert "cc-by-nc-sa-4.0" in capsys.readouterr().err and not (tmp_path / "hub3").exists()
    lone = write_model(tmp_path / "lone.safetensors", tiny_cfg(), {"objective": "ect"})
    assert main(["export", str(lone), str(tmp_path / "hub4")]) == 1
    assert "pass --license mit or --license cc-by-nc-sa-4.0" in capsys.readouterr().err
    assert main(["export", str(lone), str(tmp_path / "hub4"), "--license", "mit"]) == 0
    lost = write_run(tmp_path / "ecm3", tiny_cfg(), init=str(tmp_path / "gone.safetensors"))
    assert main(["export", str(lost), str(tmp_path / "hub5")]) == 1
    assert "gone.safetensors" in capsys.readouterr().err


def test_export_refuses_a_non_empty_folder(tmp_path, capsys):
    model = write_model(tmp_path / "m.safetensors", tiny_cfg(), {"objective": "ect"})
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert main(["export", str(model), str(dest), "--license", "mit"]) == 1
    err = capsys.readouterr().err
    assert f"{dest} is not empty" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]


def fake_hub_cache(root: Path, repo_id: str, folder: Path, *, commit: str, ref: str = "main") -> None:
    """The hub cache layout: models--OWNER--NAME/{snapshots/COMMIT/<files>, refs/REF}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


def test_hf_references_resolve_offline_from_the_cache(tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    run = write_run(tmp_path / "run", tiny_cfg(), init=None, command="pretrain")
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(cache, "me/tiny-ecm", tmp_path / "export", commit=commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    ref_model, ref_cfg, _ = load_model(run)
    expected = sample_images(ref_model, ref_cfg, torch.arange(2), steps=1)
    for ref in ("hf://me/tiny-ecm", f"hf://me/tiny-ecm@{commit}", "hf://me/tiny-ecm@main"):
        model, cfg, extra = load_model(ref)
        assert torch.equal(sample_images(model, cfg, torch.arange(2), steps=1), expected) and extra["license"] == "mit"
    assert read_model_meta("hf://me/tiny-ecm")[0] == ref_cfg

    out = tmp_path / "s.npz"
    capsys.readouterr()
    assert main(["sample", "hf://me/tiny-ecm", "--n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert main(["info", "hf://me/tiny-ecm"]) == 0
    assert '"model.safetensors"' in capsys.readouterr().out
    for missing, words in (("hf://me/other", "HF_HUB_OFFLINE is set"), ("hf://me/tiny-ecm@v2", "HF_HUB_OFFLINE is set")):
        assert main(["sample", missing, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert missing in err and words in err and len(err.strip().splitlines()) == 1
    assert main(["sample", "hf://", "--out", str(out)]) == 1
    assert "expected hf://OWNER/NAME" in capsys.readouterr().err
    # tune --init takes the architecture from the Hub model; export names it as the base model.
    assert main(["tune", "--preset", "fashion-mnist", "--init", "hf://me/tiny-ecm", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["net"]["img_resolution"] == 8
    assert main(["export", "hf://me/tiny-ecm@main", str(tmp_path / "again")]) == 0
    meta = front_matter(tmp_path / "again" / "README.md")
    assert meta["base_model"] == "me/tiny-ecm" and meta["license"] == "mit"


def test_push_uploads_the_exported_folder(tmp_path, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")
    calls: list[tuple[str, tuple, dict]] = []

    def record(name):
        def call(self, *args, **kwargs):
            if name == "upload_folder":  # the folder only exists during the call: look at it now
                folder = Path(kwargs["folder_path"])
                kwargs["files"] = sorted(p.name for p in folder.iterdir())
                kwargs["license"] = front_matter(folder / "README.md")["license"]
            calls.append((name, args, kwargs))
        return call

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(hub.HfApi, name, record(name))
    run = write_run(tmp_path / "run", tiny_cfg(), init=None, command="pretrain")
    assert main(["push", str(run), "--repo", "me/tiny-ecm", "--private", "--revision", "dev"]) == 0
    assert "pushed" in capsys.readouterr().out
    (c_name, c_args, c_kw), (b_name, b_args, b_kw), (u_name, _, u_kw) = calls
    assert (c_name, c_args, c_kw) == ("create_repo", ("me/tiny-ecm",), {"repo_type": "model", "private": True, "exist_ok": True})
    assert (b_name, b_args, b_kw) == ("create_branch", ("me/tiny-ecm",), {"branch": "dev", "repo_type": "model", "exist_ok": True})
    assert u_name == "upload_folder" and u_kw["repo_id"] == "me/tiny-ecm" and u_kw["repo_type"] == "model"
    assert u_kw["revision"] == "dev" and u_kw["files"] == ["README.md", "config.json", "model.safetensors"]
    assert u_kw["license"] == "mit"
    # An exported folder is uploaded as it is; a bad repo id is refused before anything is sent.
    calls.clear()
    assert main(["export", str(run), str(tmp_path / "exp")]) == 0
    assert main(["push", str(tmp_path / "exp"), "--repo", "me/tiny-ecm"]) == 0
    assert calls[-1][2]["folder_path"] == str(tmp_path / "exp") and calls[-1][2]["revision"] is None
    calls.clear()
    capsys.readouterr()
    assert main(["push", str(run), "--repo", "tiny-ecm"]) == 1
    assert "expected a Hub repository id OWNER/NAME" in capsys.readouterr().err and not calls


def test_missing_extras_say_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    run = write_run(tmp_path / "run", tiny_cfg(), init=None, command="pretrain")
    assert main(["push", str(run), "--repo", "me/x"]) == 1
    assert "pip install 'ectune[hub]'" in capsys.readouterr().err
    assert main(["sample", "hf://me/x", "--out", str(tmp_path / "x.png")]) == 1
    assert "pip install 'ectune[hub]'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for name in [m for m in sys.modules if m.startswith("ectune.integrations.diffusers")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["export", str(run), str(tmp_path / "d"), "--format", "diffusers"]) == 1
    assert "pip install 'ectune[diffusers]'" in capsys.readouterr().err


def test_importing_ectune_imports_no_extra():
    code = ("import sys, ectune, ectune.model, ectune.cli, ectune.hub.export, ectune.cli.export, ectune.cli.push; "
            "print(sorted(m for m in ('diffusers', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
