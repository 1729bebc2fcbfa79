"""The default job (`ectune demo`): sizing the image budget to a time budget, the stored plan that a rerun
resumes, the whole-job progress bar, and (slow) the job itself at a small fixed budget."""

from __future__ import annotations

import json

import pytest

from ectune.cli import main
from ectune.demo import Plan, load_or_make_plan, plan_budget
from ectune.training.report import JobProgress

from conftest import needs_fmnist


def test_budget_fills_the_minutes_with_twice_as_many_pretraining_images():
    # 10 minutes less 10 % and 20 s of sampling leave 520 s; a tuning image costs 2·10 + 15 = 35 s per 1000 with
    # its two pretraining images: 14.86k tuning images, rounded down to ten steps of 32 (320 images): 14.72k and 29.44k.
    plan = plan_budget(minutes=10, pretrain_sec_per_kimg=10.0, tune_sec_per_kimg=15.0, sample_sec=20.0)
    assert (plan.pretrain_kimg, plan.tune_kimg) == (29.44, 14.72)
    assert plan.expected_sec == pytest.approx(29.44 * 10 + 14.72 * 15 + 20)
    assert plan.expected_sec <= 10 * 60


def test_budget_is_capped_at_the_preset_and_floored_at_ten_steps():
    fast = plan_budget(minutes=10, pretrain_sec_per_kimg=0.1, tune_sec_per_kimg=0.1, sample_sec=1.0)
    assert (fast.pretrain_kimg, fast.tune_kimg) == (48.0, 24.0)  # the fashion-mnist preset's own budget
    slow = plan_budget(minutes=1, pretrain_sec_per_kimg=1000.0, tune_sec_per_kimg=1000.0, sample_sec=1.0)
    assert (slow.pretrain_kimg, slow.tune_kimg) == (0.64, 0.32)  # ten tuning steps of 32


def test_plan_configs_scale_the_schedule_with_the_budget():
    pre, tune = Plan(24.0, 12.0, 1.0, 1.0, 1.0, 10.0).configs()
    assert (pre.train.total_kimg, tune.train.total_kimg) == (24.0, 12.0)
    assert (pre.ema.halflife_kimg, tune.ema.halflife_kimg) == (5.0, 2.5)  # the preset's 10k and 5k, halved
    assert pre.runtime.sample_kimg == 24.0 and tune.runtime.sample_kimg == 12.0  # grids at the end only
    assert pre.runtime.status_kimg == 2.016 and pre.runtime.save_kimg == 6.016  # 2k and 6k up to whole batches of 32
    assert tune.objective.stages == 2 and tune.objective.q == 4.0


@needs_fmnist
def test_measuring_times_both_phases_and_the_grids_of_the_preset():
    from ectune.demo import measure_speed

    pre, tune, sample = measure_speed(threads=1, steps=1)
    assert all(0 < v < float("inf") for v in (pre, tune, sample))
    assert tune > pre  # a tuning step adds the target pass


def test_a_rerun_resumes_the_stored_plan_without_measuring(tmp_path, monkeypatch):
    import ectune.demo as demo

    monkeypatch.setattr(demo, "fastest_threads", lambda log: (1, (10.0, 15.0, 20.0)))
    first = load_or_make_plan(tmp_path, minutes=10, kimg=None, log=lambda m: None)
    stored = json.loads((tmp_path / "demo.json").read_text())
    assert stored["tune_kimg"] == 14.72 and stored["threads"] == 1
    assert first.configs()[0].runtime.threads == 1

    def no_measuring(log):
        raise AssertionError("a rerun must not measure again")

    monkeypatch.setattr(demo, "fastest_threads", no_measuring)
    said = []
    again = load_or_make_plan(tmp_path, minutes=3, kimg=None, log=said.append)
    assert again == first and "resuming the plan" in said[0]
    (tmp_path / "demo.json").write_text("{}")
    with pytest.raises(ValueError, match="demo.json is not a demo plan"):
        load_or_make_plan(tmp_path, minutes=3, kimg=None, log=said.append)


def test_job_progress_spans_the_phases_in_estimated_seconds():
    job = JobProgress({"pretrain": 100.0, "tune": 50.0, "sample": 10.0}, enabled=False)
    assert job.total == 160.0
    job.start("pretrain", total_kimg=4.0)
    job.advance(1.0)
    assert job.done == pytest.approx(25.0)
    job.start("tune", total_kimg=2.0, start_kimg=1.0)  # resumed halfway: that half leaves the total
    assert job.total == 135.0
    job.advance(2.0)
    assert job.done == pytest.approx(50.0)


@pytest.mark.parametrize("argv, named", [
    (["--minutes", "0"], "--minutes"),
    (["--pretrain-kimg", "1"], "--pretrain-kimg and --tune-kimg go together"),
    (["--pretrain-kimg", "1", "--tune-kimg", "-1"], "--pretrain-kimg/--tune-kimg"),
])
def test_bad_options_are_refused(argv, named, tmp_path, capsys):
    assert main(["demo", "--runs", str(tmp_path), *argv]) == 1
    assert named in capsys.readouterr().err
    assert not (tmp_path / "demo.json").exists()


@needs_fmnist
@pytest.mark.slow
def test_the_demo_runs_end_to_end_at_a_fixed_budget_and_resumes(tmp_path, capsys):
    argv = ["demo", "--runs", str(tmp_path), "--pretrain-kimg", "0.128", "--tune-kimg", "0.064", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("fm-ecm-1step.png", "fm-ecm-2step.png", "fm-dm/samples-heun.png", "fm-ecm/model.safetensors"):
        assert (tmp_path / name).exists() and str(tmp_path / name) in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert (summary["pretrain_kimg"], summary["tune_kimg"]) == (0.128, 0.064)
    assert f"ectune eval {tmp_path / 'fm-ecm'}" in out
    before = (tmp_path / "fm-ecm" / "model.safetensors").read_bytes()
    assert main(argv) == 0  # a rerun finds both runs finished and only samples again
    assert (tmp_path / "fm-ecm" / "model.safetensors").read_bytes() == before
