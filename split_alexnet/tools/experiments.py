"""Rerun the paper's ablations, Figure 1, and the initialisation readings.

    python -m split_alexnet.experiments relu-vs-tanh --demo --budget-steps 300
    python -m split_alexnet.experiments init --demo --budget-steps 120 --seeds 2
    python -m split_alexnet.experiments lrn --data /data/ilsvrc12 --epochs 90 --gpus 0,1
    python -m split_alexnet.experiments overlap-pool --data DIR --budget-steps 500 -- --lr 0.005

Each experiment trains its variants with everything else equal (same data, same settings,
same seeds 0..K-1): one base :class:`TrainConfig`, and for each run its variant's switch, the
seed and ``out=OUT/<variant>-seed<k>`` set with ``TrainConfig.with_settings``
(``dataclasses.replace``), trained in-process by ``training.trainer.train``. Then it writes
to OUT:

* ``results.md``: variant, final val top-1 / top-5 error (centre crop), steps (and training
  seconds) to the experiment's target, and the paper's figure where it gives one;
* ``curves.png``: smoothed training top-1 error per variant (mean over seeds);
* ``results.json``: every number, per seed, with the command that reproduces each run
  (derived from its config).

Targets. ``relu-vs-tanh`` (Figure 1): the first step at which the training top-1 error,
smoothed over a trailing window of ``--smooth`` steps, is at most 25%. ``init``: the first step
at which the smoothed training error leaves chance: chance is ``p = 1 - 1/C`` (C classes) and
the threshold ``p - max(0.5/C, 3 * sqrt(p(1-p) / (smooth * batch)))``, half a class's share
below chance and at least three standard errors of the smoothed estimate below it. Every other
experiment reports the same "leaves chance" step for information; its claim is the final error.

Flags after ``--`` go to the trainer unchanged, for every variant (they come last, so they win
over the experiment's own defaults but a variant's own switch is re-applied after them).
docs/experiments.md has the claims, the results measured here, and how to run on ImageNet.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.network.placement import DEVICE_HELP, resolve_devices
from split_alexnet.tools.evaluate import evaluate_checkpoint, write_json
from split_alexnet.training.config import TrainConfig, to_flags
from split_alexnet.training.options import parse_config
from split_alexnet.training.loop import Diverged
from split_alexnet.training.metrics import read_records
from split_alexnet.training.trainer import train
from split_alexnet.utils.cli import UsageError, run
from split_alexnet.utils.fileio import atomic_write
from split_alexnet.utils.flags import WORKERS, Number
from split_alexnet.utils.plot import curves_png

PROG = "split_alexnet.experiments"


@dataclass(frozen=True)
class Experiment:
    name: str
    question: str
    variants: tuple[tuple[str, dict[str, Any]], ...]  # (name, trainer settings); paper's first
    target: str                                         # "err25" or "chance"
    paper: dict[str, str] = field(default_factory=dict)  # variant -> the paper's figure
    claim: str = ""
    setting_note: str = ""
    delta: tuple[float, float] | None = None  # paper's (top-1, top-5) change, first vs second


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        "relu-vs-tanh", "Figure 1: how much faster does ReLU reach 25% training error than tanh?",
        (("relu", {"activation": "relu"}), ("tanh", {"activation": "tanh"})),
        target="err25",
        paper={"relu": "6x fewer steps to 25% train error than tanh",
               "tanh": "(baseline of the 6x)"},
        claim="ReLU reaches 25% training error six times faster than tanh (Figure 1).",
        setting_note="The paper's Figure 1 is a four-layer CNN on CIFAR-10, not AlexNet on "
                     "ImageNet; here it is the full AlexNet on whatever --data is."),
    Experiment(
        "lrn", "Does local response normalisation lower the error?",
        (("lrn-paper", {"lrn": "paper"}), ("lrn-off", {"lrn": "off"})),
        target="chance",
        paper={"lrn-paper": "-1.4 top-1 / -1.2 top-5 (vs no LRN)"},
        claim="LRN reduces top-1 / top-5 error by 1.4 / 1.2 points (section 3.3).",
        delta=(-1.4, -1.2)),
    Experiment(
        "overlap-pool", "Does overlapping pooling (3/2) beat non-overlapping (2/2)?",
        (("pool-3s2", {"pool": "3/2"}), ("pool-2s2", {"pool": "2/2"})),
        target="chance",
        paper={"pool-3s2": "-0.4 top-1 / -0.3 top-5 (vs 2/2)"},
        claim="Overlapping pooling reduces top-1 / top-5 error by 0.4 / 0.3 points "
              "(section 3.4).",
        delta=(-0.4, -0.3)),
    Experiment(
        "towers-vs-half", "Do the two towers beat a one-device net with half the kernels?",
        (("towers", {"arch": "alexnet"}), ("half", {"arch": "half"})),
        target="chance",
        paper={"towers": "-1.7 top-1 / -1.2 top-5 (vs half)"},
        claim="The two-tower net has 1.7 / 1.2 points lower top-1 / top-5 error than the "
              "one-device net with half the kernels in conv1-conv4 (section 3.2).",
        delta=(-1.7, -1.2)),
    Experiment(
        "pca-noise", "Does PCA colour noise lower the error?",
        (("pca-paper", {"pca": "paper"}), ("pca-off", {"pca": "off"})),
        target="chance",
        paper={"pca-paper": "more than -1 top-1 (vs off)"},
        claim="PCA colour augmentation reduces top-1 error by over 1 point (section 4.1).",
        delta=(-1.0, float("nan"))),
    Experiment(
        "init", "Which initialisation reading leaves chance, and how fast?",
        (("paper", {"init": "paper"}), ("cuda-convnet2", {"init": "cuda-convnet2"}),
         ("caffe", {"init": "caffe"})),
        target="chance",
        paper={"paper": "measured before (docs/experiments.md): at chance for all 330 steps",
               "cuda-convnet2": "measured before (docs/experiments.md): at chance for 220 steps",
               "caffe": "measured before (docs/experiments.md): val error 12% within 60 steps"},
        claim="The paper's biases of 1 (section 5) train ImageNet in its 90-epoch runs; on a "
              "small generated set they were measured sitting at chance for hundreds of steps "
              "while Caffe's 0.1 learned within 60 (docs/experiments.md, the init question).",
        setting_note="The reference figures are this project's earlier CPU measurement (5 "
                     "classes, 320 images, batch 32, lr 0.01), not the paper's."),
)}


# ------------------------------------------------------------------------------ numbers


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
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else None


def _std(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and x == x]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(runs: list[dict]) -> dict:
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


# ------------------------------------------------------------------------------ outputs


def _pct(x: float | None, sd: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _target_cell(a: dict, target_name: str) -> str:
    if a["diverged"] == a["seeds"]:
        return f"diverged (loss or weights NaN/inf) by step {a['budget_steps'] + 1}"
    if a["target_reached"] == 0:
        return f"not reached within {a['budget_steps']} steps"
    cell = f"{a['target_step_mean']:.0f} steps ({a['target_seconds_mean']:.0f} s)"
    if a["target_reached"] < a["seeds"]:
        cell += f"; reached by {a['target_reached']}/{a['seeds']} seeds"
    if a["diverged"]:
        cell += f"; {a['diverged']}/{a['seeds']} seeds diverged"
    return cell


def comparisons(exp: Experiment, summary: dict) -> list[str]:
    names = [v for v, _ in exp.variants]
    lines = []
    if exp.name == "relu-vs-tanh":
        r, t = summary["relu"], summary["tanh"]
        if r["target_reached"] and t["target_reached"]:
            ratio = t["target_step_mean"] / r["target_step_mean"]
            lines.append(f"Measured: tanh needed {ratio:.1f}x the steps of ReLU to reach 25% "
                         "training error (paper: 6x, CIFAR-10, four-layer CNN).")
        elif r["target_reached"]:
            lines.append(f"Measured: ReLU reached 25% training error at step "
                         f"{r['target_step_mean']:.0f}; tanh did not within "
                         f"{t['budget_steps']} steps, so the ratio is more than "
                         f"{t['budget_steps'] / r['target_step_mean']:.1f}x (paper: 6x).")
        else:
            lines.append("Measured: ReLU did not reach 25% training error within the budget, "
                         "so this run says nothing about the 6x.")
    elif exp.delta is not None:
        a, b = summary[names[0]], summary[names[1]]
        if a["top1_err_mean"] is not None and b["top1_err_mean"] is not None:
            d1 = 100 * (a["top1_err_mean"] - b["top1_err_mean"])
            d5 = 100 * (a["top5_err_mean"] - b["top5_err_mean"])
            p1, p5 = exp.delta
            paper5 = f"{p5:+.1f}" if p5 == p5 else "not given"
            lines.append(f"Measured difference {names[0]} minus {names[1]}: {d1:+.1f} top-1 / "
                         f"{d5:+.1f} top-5 points (paper: {p1:+.1f} / {paper5}).")
    return lines


def write_markdown(path: Path, exp: Experiment, result: dict) -> None:
    s = result["settings"]
    target_name = ("steps to 25% train err" if exp.target == "err25"
                   else f"steps to leave chance (train err < {result['chance_threshold']:.2f})")
    lines = [f"# experiments {exp.name}", "", exp.question, "",
             f"- claim: {exp.claim}"]
    if exp.setting_note:
        lines.append(f"- setting: {exp.setting_note}")
    lines += [f"- data: {s['data']} ({result['num_classes']} classes)",
              f"- budget: {s['budget']}; seeds {s['seeds']}; smoothing window {s['smooth']} "
              f"steps; trainer flags shared by all variants: `{' '.join(s['common_flags'])}`",
              f"- finished {result['finished']}, {result['wall_seconds']:.0f} s wall "
              "(training seconds in the table exclude evaluation and checkpoints)", "",
              f"| variant | flags | seeds | top-1 err (val, centre) | top-5 err | {target_name} "
              "| paper |", "|---|---|---|---|---|---|---|"]
    for name, settings in exp.variants:
        a = result["summary"][name]
        lines.append(f"| {name} | `{' '.join(to_flags(settings))}` | {a['seeds']} | "
                     f"{_pct(a['top1_err_mean'], a['top1_err_std'])} | "
                     f"{_pct(a['top5_err_mean'], a['top5_err_std'])} | "
                     f"{_target_cell(a, target_name)} | {exp.paper.get(name, '-')} |")
    lines.append("")
    lines += result["comparisons"]
    fired = [n for n, _ in exp.variants if result["summary"][n]["watchdog_fired"]]
    if fired:
        lines.append(f"The trainer's watchdog said 'not learning' for: {', '.join(fired)}.")
    if result["num_classes"] <= 5:
        lines.append(f"With {result['num_classes']} classes top-5 error is trivially 0.")
    lines.append("")
    text = "\n".join(lines)
    atomic_write(path, lambda f: f.write(text.encode()), private=False)


def write_png(path: Path, exp: Experiment, result: dict) -> None:
    series = []
    last = 1
    for name, _ in exp.variants:
        curves = [r["curve"] for r in result["runs"][name]]
        common = sorted(set.intersection(*(set(c["step"]) for c in curves))) if curves else []
        ys = [sum(c["smoothed"][c["step"].index(st)] for c in curves) / len(curves)
              for st in common]
        series.append((f"{name} (train, smoothed)", common, ys))
        last = max([last, *common])
    thr = 0.25 if exp.target == "err25" else result["chance_threshold"]
    series.append((f"target {thr:.2f}", [0, last], [thr, thr]))
    curves_png(path, series, title=f"experiments {exp.name}: training top-1 error "
               f"(trailing mean of {result['settings']['smooth']} steps, mean of "
               f"{result['settings']['seeds']} seed(s))", xlabel="step", ylabel="error",
               ylim=(0.0, 1.0))


# ------------------------------------------------------------------------------ running


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog=f"python -m {PROG}",
                                description="Rerun one of the paper's comparisons.")
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    p.add_argument("--data", help="dataset root with train/ and val/ (default: --demo)")
    p.add_argument("--demo", action="store_true",
                   help="generate the demo set under OUT/demo_data and use the demo preset")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget-steps", action=Number, min=1,
                   help="optimizer steps per run (--max-steps)")
    g.add_argument("--epochs", action=Number, min=1,
                   help="epochs per run instead of a step budget")
    p.add_argument("--seeds", action=Number, min=1, default=1,
                   help="seeds 0..K-1 for every variant")
    p.add_argument("--out", help="output folder (default runs/experiments/NAME)")
    p.add_argument("--devices", help=f"{DEVICE_HELP['devices']} With neither flag: GPUs 0 "
                                     "and 1, or the CPU for the demo and when there is no GPU.")
    p.add_argument("--gpus", help=DEVICE_HELP["gpus"])
    p.add_argument("--batch-size", action=Number, min=1,
                   help="images per step (default: the trainer's or the demo preset's)")
    p.add_argument("--smooth", action=Number, min=1, default=10,
                   help="trailing window (steps) for the training error (default 10)")
    p.add_argument("--workers", action=Number, **WORKERS, help="DataLoader workers per run")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's .pt files (about 450 MB each); default: delete them "
                        "once the run's numbers are read")
    p.add_argument("--variants", help="comma-separated subset of the variants to run")
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise SystemExit(2) from None
        raise
    return a, extra


def _count_classes(root: Path) -> int:
    return sum(1 for d in (root / "train").iterdir() if d.is_dir()) if (root / "train").is_dir() \
        else 0


def main(argv: Sequence[str] | None = None) -> int:
    a, extra = parse_args(argv)
    parse_config(extra)  # the trainer's flags after --: checked before any work
    exp = EXPERIMENTS[a.name]
    out = Path(a.out or f"runs/experiments/{a.name}")
    out.mkdir(parents=True, exist_ok=True)
    demo = a.demo or a.data is None
    if demo and a.data is None:
        data = out / "demo_data"
        print(f"{PROG}: no --data: using the generated demo set in {data}", file=sys.stderr)
        make_demo_dataset(data, seed=0)
    else:
        data = Path(a.data)
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        raise UsageError(f"--data {data} needs train/<class>/ and val/<class>/ folders")
    variants = list(exp.variants)
    if a.variants:
        wanted = [v.strip() for v in a.variants.split(",") if v.strip()]
        unknown = sorted(set(wanted) - {n for n, _ in variants})
        if unknown:
            raise UsageError(f"--variants: {a.name} has {', '.join(n for n, _ in variants)}; "
                             f"not {', '.join(unknown)}")
        variants = [v for v in variants if v[0] in wanted]
        exp = Experiment(**{**exp.__dict__, "variants": tuple(variants)})

    # One base config for every run: the experiment's settings, then the flags after --.
    devices = resolve_devices(a.gpus, a.devices, default="paper" if torch.cuda.is_available()
                              and not demo else "cpu")
    settings: dict[str, Any] = {"demo": demo, "data": str(data), "gpus": None,
                                "devices": ",".join(map(str, devices)), "log_interval": 1,
                                "ten_crop": False}
    if a.budget_steps is not None:
        # Enough epochs that the step budget, not the epoch count, ends the run.
        settings.update(max_steps=a.budget_steps, epochs=100000)
        budget = f"{a.budget_steps} steps per run"
    elif a.epochs is not None:
        settings.update(epochs=a.epochs)
        budget = f"{a.epochs} epochs per run"
    else:
        budget = "the trainer's epochs" + (" (demo preset)" if demo else "")
    if a.batch_size is not None:
        settings.update(batch_size=a.batch_size)
    if a.workers is not None:
        settings.update(workers=a.workers)
    base = parse_config(extra, base=settings)
    switched = {k for _, v in variants for k in v}
    common = base.to_argv(leave_out=("config", "out", "seed", *switched))

    num_classes = _count_classes(data)
    t_start = time.monotonic()
    runs: dict[str, list[dict]] = {}
    commands: dict[str, list[str]] = {}
    for seed in range(a.seeds):
        for name, switch in variants:
            run_out = out / f"{name}-seed{seed}"
            if run_out.exists():
                shutil.rmtree(run_out)  # a fresh run: metrics.jsonl appends otherwise
            cfg = base.with_settings(**switch, seed=seed, out=str(run_out))
            commands[f"{name}-seed{seed}"] = ["python", "-m", "split_alexnet.train",
                                              *cfg.to_argv()]
            print(f"{PROG}: {a.name}: {name} seed {seed}: train {' '.join(cfg.to_argv())}",
                  file=sys.stderr)
            diverged = None
            try:
                train(cfg)
            except Diverged as e:
                diverged = str(e)  # NaN/inf loss or weights: a result of this variant
                print(f"{PROG}: {name} seed {seed} diverged: {e}", file=sys.stderr)
            fv = final_val(cfg) if diverged is None \
                else {"step": None, "top1_err": None, "top5_err": None, "loss": None, "n": None}
            summary = summarise_run(run_out, target=exp.target, window=a.smooth,
                                    num_classes=num_classes, batch=cfg.optim.batch_size, final=fv)
            summary["seed"] = seed
            summary["diverged"] = diverged
            runs.setdefault(name, []).append(summary)
            if not a.keep_checkpoints:
                for pt in run_out.glob("*.pt"):
                    pt.unlink()
    summ = {name: aggregate(runs[name]) for name, _ in variants}
    result = {
        "experiment": exp.name, "question": exp.question, "claim": exp.claim,
        "setting_note": exp.setting_note, "paper": exp.paper,
        "paper_delta_top1_top5": list(exp.delta) if exp.delta else None,
        "target": exp.target,
        "chance_threshold": runs[variants[0][0]][0]["reached"]["chance"]["threshold"],
        "num_classes": num_classes,
        "settings": {"data": str(data), "demo": demo, "budget": budget, "seeds": a.seeds,
                     "smooth": a.smooth, "common_flags": common,
                     "variants": {n: to_flags(v) for n, v in variants}},
        "commands": commands,
        "wall_seconds": time.monotonic() - t_start,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": str(torch.__version__),
        "summary": summ,
        "runs": runs,
    }
    result["comparisons"] = comparisons(exp, summ) if len(variants) == len(
        EXPERIMENTS[a.name].variants) else []
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(out / "results.json", lambda f: f.write(text.encode()), private=False)
    write_markdown(out / "results.md", exp, result)
    write_png(out / "curves.png", exp, result)
    print((out / "results.md").read_text())
    print(f"{PROG}: wrote {out / 'results.md'}, {out / 'curves.png'}, {out / 'results.json'}",
          file=sys.stderr)
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
