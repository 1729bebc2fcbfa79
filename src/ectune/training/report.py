"""Status reporting: progress bar, status lines, log.txt, stats.jsonl and the loss-curve plot (rank 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

import torch
from torch import Tensor

from ..config import RunConfig
from ..runtime import distributed as rt_dist
from ..runtime.checkpoint import atomic_write
from .trackers import metric_scalars, open_trackers, status_scalars


class JobProgress:
    """One progress bar over the phases of a job (the demo: pretraining, tuning, sampling), counted in estimated
    seconds of work, so that its time left covers the whole job and corrects itself if the machine runs slower or
    faster than estimated. The bar names the phase and its images/s."""

    def __init__(self, estimates: dict[str, float], *, enabled: bool = True) -> None:
        self.estimates = estimates
        self.total, self.done = sum(estimates.values()), 0.0  # estimated seconds of work: all, done
        self.bar = tqdm(total=self.total, disable=not enabled, dynamic_ncols=True, leave=False,
                        bar_format="job {percentage:3.0f}%|{bar}| {desc} [{elapsed}, {remaining} left]")
        self.phase_name, self.phase_total, self.phase_first, self.phase_done = "", 1.0, 0.0, 0.0
        self.phase_start = time.time()

    def start(self, name: str, *, total_kimg: float, start_kimg: float = 0.0) -> None:
        """Begin phase `name` of `total_kimg` (estimated as `estimates[name]` seconds); work already done by an
        earlier, interrupted run of the job leaves the bar's total."""
        self.phase_name, self.phase_total, self.phase_first, self.phase_done = name, total_kimg, start_kimg, start_kimg
        self.phase_start = time.time()
        if start_kimg > 0 and total_kimg > 0:
            self.total -= self.estimates[name] * start_kimg / total_kimg
            self.bar.total = self.total
        self.bar.set_description_str(name)

    def advance(self, kimg: float) -> None:
        """The phase has reached `kimg`."""
        work = self.estimates[self.phase_name] * (kimg - self.phase_done) / max(self.phase_total, 1e-9)
        work = min(work, self.total - self.done)  # the phases' float sums can overshoot the total by a rounding
        self.done += work
        self.bar.update(work)
        self.phase_done = kimg
        rate = (kimg - self.phase_first) * 1000 / max(time.time() - self.phase_start, 1e-9)
        self.bar.set_description_str(f"{self.phase_name} {kimg:.1f}/{self.phase_total:.1f} kimg, {rate:.0f} img/s",
                                     refresh=False)

    def close(self) -> None:
        self.bar.close()


class Reporter:
    """Collects per-interval statistics and writes them. Every method is a no-op on ranks other than 0.

    Progress goes to its own bar (`progress`), or to one phase of a `job`'s bar. The trackers `cfg.runtime`
    switches on (ectune.training.trackers) get the same records."""

    def __init__(self, run_dir: Path, *, total_kimg: float, start_kimg: float, enabled: bool = True,
                 progress: bool = True, job: JobProgress | None = None, phase: str = "", cfg: RunConfig | None = None) -> None:
        self.run_dir, self.enabled, self.progress = run_dir, enabled, progress or job is not None
        self.stats_path, self.log_path = run_dir / "stats.jsonl", run_dir / "log.txt"
        self.job = job if enabled else None
        self.bar = tqdm(total=round(total_kimg, 3), initial=round(start_kimg, 3), unit="kimg",
                        disable=not (enabled and progress) or job is not None, dynamic_ncols=True, leave=False,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]")
        if self.job is not None:
            self.job.start(phase, total_kimg=total_kimg, start_kimg=start_kimg)
        self.last_kimg = start_kimg
        self.start_time = time.time()
        self.trackers = open_trackers(cfg if enabled else None, run_dir)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        tqdm.write(message) if self.progress else print(message, flush=True)
        with open(self.log_path, "a") as f:
            f.write(message + "\n")

    def advance(self, kimg: float) -> None:
        if self.enabled:
            self.bar.update(round(kimg - self.last_kimg, 3))
            self.last_kimg = kimg
            if self.job is not None:
                self.job.advance(kimg)

    def status(self, stats: dict[str, Any]) -> None:
        """One status line plus a stats.jsonl record; refreshes the loss plot."""
        if not self.enabled:
            return
        line = (f"kimg {stats['kimg']:9.1f}  loss {stats['loss']:.4g}  stage {stats['stage']}  r/t {stats['mean_r_over_t']:.3f}"
                f"  lr {stats['lr']:.3g}  sec/kimg {stats['sec_per_kimg']:.2f}  img/s {stats['img_per_s']:.0f}"
                f"  mem {stats['mem_gb']:.2f}GB" + (f"  skipped {stats['skipped_steps']}" if stats["skipped_steps"] else ""))
        self.log(line)
        with open(self.stats_path, "a") as f:
            f.write(json.dumps(stats) + "\n")
        plot_curves(self.stats_path, self.run_dir / "loss.png")
        self.trackers.log_scalars(stats["kimg"], status_scalars(stats))

    def metric(self, record: dict[str, Any]) -> None:
        """An evaluation result during training: {'kimg', 'metric_name', 'metric_value', ...}."""
        if not self.enabled:
            return
        self.log(f"kimg {record['kimg']:9.1f}  {record['metric_name']} {record['metric_value']:.3f}  "
                 + "  ".join(f"{k} {v}" for k, v in record.items() if k not in ("kimg", "metric_name", "metric_value")))
        with open(self.stats_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        plot_curves(self.stats_path, self.run_dir / "loss.png")
        self.trackers.log_scalars(record["kimg"], metric_scalars(record))

    def images(self, kimg: float, grids: dict[str, Path]) -> None:
        """Sample grids written at `kimg` (name -> PNG), for the trackers as samples/<name>."""
        if self.enabled:
            for name, path in grids.items():
                self.trackers.log_image(f"samples/{name}", kimg, path)

    def close(self) -> None:
        self.bar.close()
        self.trackers.close()


class IntervalMeter:
    """Loss (summed on the device, no sync), images, mean r/t and wall-clock time since the last status line."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        self.r_over_t: list[float] = []
        self.started = time.time()

    def add(self, loss_sum: Tensor, count: int, r_over_t: float) -> None:
        self.loss += loss_sum.double()
        self.count += count
        self.r_over_t.append(r_over_t)

    def summary(self) -> dict[str, float]:
        """The interval's mean loss over all ranks, mean r/t, sec/kimg and img/s (all ranks together); then reset.
        `count` is the global batch, so the per-rank loss sums add up to its images."""
        total = rt_dist.all_reduce_sum_(self.loss.clone())
        elapsed = max(time.time() - self.started, 1e-9)
        out = {"loss": float(total) / max(self.count, 1),
               "r_over_t": sum(self.r_over_t) / max(len(self.r_over_t), 1),
               "sec_per_kimg": elapsed / max(self.count / 1000, 1e-9), "img_per_s": self.count / elapsed}
        self.reset()
        return out


def read_stats(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


def plot_curves(stats_path: Path, out: Path) -> None:
    """Loss vs images seen (and any evaluated metric) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_stats(stats_path)
    loss = [(r["kimg"], r["loss"]) for r in rows if "loss" in r]
    metric = [(r["kimg"], r["metric_value"], r.get("metric_name", "FD")) for r in rows if "metric_value" in r]
    if not loss:
        return
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10 if metric else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*loss))
    ax.set_xlabel("training images (kimg)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if metric:
        ax2 = axes[0][1]
        ax2.plot([m[0] for m in metric], [m[1] for m in metric], marker="o")
        ax2.set_xlabel("training images (kimg)")
        ax2.set_ylabel(metric[-1][2])
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
