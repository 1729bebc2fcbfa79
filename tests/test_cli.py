"""The command line as a whole: every command's options (generated from its dataclass) keep their spellings, and
commands that do not train never import the training loop."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ectune.cli import COMMANDS, main

OPTIONS = {
    "demo": ["--minutes", "--runs", "--pretrain-kimg", "--tune-kimg", "--quiet"],
    "pretrain": ["--preset", "--run-dir", "--run", "--dry-run", "--until-kimg", "--quiet", "--train.total-kimg",
                 "--objective.q", "--net.dropout", "--runtime.compile", "--runtime.no-compile"],
    "tune": ["--init", "--objective", "--run-dir", "--until-kimg", "--objective.kind", "--sample.mid-t"],
    "sample": ["MODEL", "--steps", "--mid-t", "--method", "--sigma-min-shift", "--n", "--seed", "--class", "--batch",
               "--device", "--out", "--force", "--guidance", "--guide", "--latents",
               "--init-image", "--t", "--strength"],
    "info": ["PATH"],
    "convert-images": ["SRC", "DEST", "--resolution", "--channels"],
    "eval": ["MODEL", "--metric", "--steps", "--heun", "--n", "--seed", "--mid-t", "--sigma-min-shift", "--search-mid-t",
             "--search-n", "--search-iters", "--search-range", "--pr", "--pr-n", "--ref-max", "--out", "--weights",
             "--cache-dir", "--batch", "--device", "--ref"],
    "ref-stats": ["--preset", "--metric", "--weights", "--cache-dir", "--max-images", "--batch", "--device",
                  "--data.source", "--data.path"],
    "import-edm": ["PICKLE", "--out", "--kind", "--preset", "--sigma-min-shift"],
    "encode-latents": ["IMAGES", "OUT", "--resolution", "--vae", "--latent-mean", "--latent-std", "--store-posterior",
                       "--shard-size", "--batch", "--device"],
    "export": ["MODEL", "DIR", "--format", "--name", "--repo", "--license", "--force"],
    "push": ["MODEL", "--repo", "--format", "--private", "--revision", "--message", "--license"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    words = set(capsys.readouterr().out.replace(",", " ").split())
    missing = [o for o in OPTIONS[command] if o not in words]
    assert not missing, missing
    # Switches are plain flags, as `--force` always was; only config fields come in --x/--no-x pairs.
    assert not {"--no-force", "--no-dry-run", "--no-heun", "--no-quiet"} & words


def test_run_dir_alias_and_dry_run(tmp_path, capsys):
    assert main(["pretrain", "--run-dir", str(tmp_path / "r"), "--dry-run", "--train.batch", "32"]) == 0
    assert '"batch": 32' in capsys.readouterr().out and not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_mid_t_needs_a_value(command, model_file, capsys):
    out = model_file.parent / "x.png"
    assert main([command, str(model_file), "--mid-t", "--out", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "--mid-t (none): expected times strictly decreasing" in err and len(err.strip().splitlines()) == 1


def test_commands_that_do_not_train_leave_the_loop_alone():
    modules = [f"ectune.cli.{m}" for m in sorted(set(COMMANDS.values()) - {"train"})]
    code = f"import sys, {', '.join(modules)}; print('ectune.training.loop' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
