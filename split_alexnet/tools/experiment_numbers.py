"""Reads an experiment's training runs into numbers: the smoothed training error, the step at
which each target is reached, the final validation error, and their means over seeds.

Targets. ``relu-vs-tanh`` (Figure 1): the first step at which the training top-1 error,
smoothed over a trailing window of ``--smooth`` steps, is at most 25%. ``init``: the first step
at which the smoothed training error leaves chance: chance is ``p = 1 - 1/C`` (C classes) and
the threshold ``p - max(0.5/C, 3 * sqrt(p(1-p) / (smooth * batch)))``, half a class's share
below chance and at least three standard errors of the smoothed estimate below it. Every other
experiment reports the same "leaves chance" step for information; its claim is the final error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from split_alexnet.tools.evaluate import evaluate_checkpoint
from split_alexnet.training.config import TrainConfig
from split_alexnet.training.metrics import read_records
from split_alexnet.utils.fileio import write_json


def smooth(errs: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, e in enumerate(errs):
        acc += e
        if i >= window:
            acc -= errs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def first_crossing(steps: Sequence[int], smoothed: Sequence[float], threshold: float,
                   window: int) -> int | None:
    """The first step whose trailing window is full and whose smoothed error is at most
    ``threshold`` (None if there is none)."""
    for i, (s, e) in enumerate(zip(steps, smoothed)):
        if i + 1 >= window and e <= threshold:
            return int(s)
    return None


def chance_threshold(num_classes: int, window: int = 1, batch: int = 1) -> float:
    """Smoothed training error below which a run has left chance (chance is p = 1 - 1/C):
    p - max(0.5/C, 3 standard errors of a mean over ``window`` batches of ``batch`` images).
    Half a class's share below chance, and never inside the noise of the estimate."""
    p = 1.0 - 1.0 / num_classes
    se = math.sqrt(p * (1.0 - p) / max(1, window * batch))
    return p - max(0.5 / num_classes, 3.0 * se)


def train_seconds(train_recs: list[dict], batch: int) -> list[float]:
    """Cumulative seconds spent in training steps at each record (evaluation excluded), from
    each record's window of steps and its images/s."""
    total, prev, out = 0.0, 0, []
    for r in train_recs:
        n = (r["step"] - prev) * batch
        total += n / max(r.get("images_per_s", 0.0), 1e-9)
        prev = r["step"]
        out.append(total)
    return out


def summarise_run(out: Path, *, target: str, window: int, num_classes: int, batch: int,
                  final: dict) -> dict:
    """One run's numbers from its metrics.jsonl in ``out``: steps, training seconds, the
    step each target was reached (``target`` the experiment's), its smoothed training-error
    curve, the watchdog's record; ``final`` is its final val record (:func:`final_val`)."""
    recs = read_records(out, missing_ok=True)
    train = [r for r in recs if r["kind"] == "train"]
    steps = [int(r["step"]) for r in train]
    errs = [float(r["top1_err"]) for r in train]
    sm = smooth(errs, window)
    secs = train_seconds(train, batch)
    thresholds = {"err25": 0.25, "chance": chance_threshold(num_classes, window, batch)}
    reached = {}
    for key, thr in thresholds.items():
        s = first_crossing(steps, sm, thr, window)
        reached[key] = {"threshold": thr, "step": s,
                        "train_seconds": None if s is None else round(secs[steps.index(s)], 2)}
    watchdog = [r for r in recs if r["kind"] == "watchdog"]
    return {
        "out": str(out),
        "steps": steps[-1] if steps else 0,
        "train_seconds": round(secs[-1], 2) if secs else 0.0,
        "final_val": final,
        "target": reached[target],
        "reached": reached,
        "final_smoothed_train_err": sm[-1] if sm else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "watchdog": watchdog[0] if watchdog else None,
        "curve": {"step": steps, "train_top1_err": errs, "smoothed": sm},
    }


def final_val(cfg: TrainConfig) -> dict:
    """The run's last centre-crop val record, if it is at the last step; otherwise evaluate
    OUT/last.pt now, as trained (a run stopped by --max-steps mid-epoch logs no val record),
    and keep the results in OUT/final_val.json."""
    out = Path(cfg.checkpoint.out)
    recs = read_records(out, missing_ok=True)
    train_recs = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    last_step = train_recs[-1]["step"] if train_recs else 0
    if val and val[-1]["step"] == last_step:
        v = val[-1]
        return {"step": v["step"], "top1_err": v["top1_err"], "top5_err": v["top5_err"],
                "loss": v["loss"], "n": v.get("n")}
    rt = cfg.runtime
    results = evaluate_checkpoint(out / "last.pt", Path(cfg.data.data), gpus=rt.gpus,
                                  devices=rt.devices, single_device=rt.single_device,
                                  batch_size=32, workers=cfg.data.workers)
    write_json(out / "final_val.json", results)
    c = results["center"]
    return {"step": last_step, "top1_err": c["top1_err"], "top5_err": c["top5_err"],
            "loss": c["loss"], "n": c["n"]}


def _mean(xs: Sequence[float | None]) -> float | None:
    """Mean of the numbers that are there (None and NaN left out); None if there are none."""
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else None


def _std(xs: Sequence[float | None]) -> float | None:
    """Sample standard deviation of the numbers that are there; None for fewer than two."""
    xs = [x for x in xs if x is not None and x == x]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(runs: list[dict]) -> dict:
    """One variant's numbers over its seeds' runs (:func:`summarise_run`): mean and spread
    of the final errors, how many reached the target and how fast, watchdogs, divergences."""
    t1 = [r["final_val"]["top1_err"] for r in runs]
    t5 = [r["final_val"]["top5_err"] for r in runs]
    hit = [r["target"]["step"] for r in runs if r["target"]["step"] is not None]
    secs = [r["target"]["train_seconds"] for r in runs if r["target"]["step"] is not None]
    return {"seeds": len(runs), "top1_err_mean": _mean(t1), "top1_err_std": _std(t1),
            "top5_err_mean": _mean(t5), "top5_err_std": _std(t5),
            "target_reached": len(hit), "target_step_mean": _mean(hit),
            "target_seconds_mean": _mean(secs),
            "budget_steps": max((r["steps"] for r in runs), default=0),
            "watchdog_fired": sum(1 for r in runs if r["watchdog"]),
            "diverged": sum(1 for r in runs if r.get("diverged"))}
