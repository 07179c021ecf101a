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

The experiments themselves (variants, targets, the paper's figures) are listed in
tools/experiment_definitions.py; how a run's numbers and the targets (25% training error,
leaving chance) are read, in tools/experiment_numbers.py.

Flags after ``--`` go to the trainer unchanged, for every variant (they come last, so they win
over the experiment's own defaults but a variant's own switch is re-applied after them).
docs/experiments.md has the claims, the results measured here, and how to run on ImageNet.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.network.placement import DEVICE_HELP, resolve_devices
from split_alexnet.tools.experiment_definitions import EXPERIMENTS, Experiment, StepRatio
from split_alexnet.tools.experiment_numbers import (aggregate, chance_threshold, final_val,
                                                    first_crossing, smooth, summarise_run)
from split_alexnet.training.config import TrainConfig, to_flags
from split_alexnet.training.options import parse_config
from split_alexnet.training.metrics import Diverged
from split_alexnet.training.trainer import train
from split_alexnet.utils.cli import Parser, UsageError, run
from split_alexnet.utils.fileio import atomic_write, write_json
from split_alexnet.utils.flags import WORKERS, Number
from split_alexnet.utils.plot import curves_png

PROG = "split_alexnet.experiments"


# ------------------------------------------------------------------------------ outputs


def _pct(x: float | None, sd: float | None = None) -> str:
    """An error rate as a table cell: percent, ± its standard deviation over seeds."""
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _target_cell(a: dict, target_name: str) -> str:
    """The table's target cell of one variant (its :func:`aggregate`): the mean steps and
    seconds to the target, or why there are none."""
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
    """The sentences that set the measured variants against the paper's figures: its
    steps-to-target ratio and its error difference, where the experiment has them."""
    lines = []
    if exp.ratio is not None:
        lines.append(_ratio_sentence(exp.ratio, *_first_two(exp, summary)))
    if exp.delta is not None:
        lines += _delta_sentences(exp, *_first_two(exp, summary))
    return lines


def _first_two(exp: Experiment, summary: dict) -> tuple[dict, dict]:
    """The summaries of the experiment's first two variants (the paper's, then the other)."""
    (first, _), (second, _) = exp.variants[:2]
    return summary[first], summary[second]


def _ratio_sentence(ratio: StepRatio, first: dict, second: dict) -> str:
    """How many times the first variant's steps to the target the second needed."""
    a, b = ratio.labels
    paper = f"{ratio.paper:g}x"
    if first["target_reached"] and second["target_reached"]:
        times = second["target_step_mean"] / first["target_step_mean"]
        return (f"Measured: {b} needed {times:.1f}x the steps of {a} to reach {ratio.goal} "
                f"(paper: {paper}, {ratio.where}).")
    if first["target_reached"]:
        return (f"Measured: {a} reached {ratio.goal} at step {first['target_step_mean']:.0f}; "
                f"{b} did not within {second['budget_steps']} steps, so the ratio is more "
                f"than {second['budget_steps'] / first['target_step_mean']:.1f}x "
                f"(paper: {paper}).")
    return (f"Measured: {a} did not reach {ratio.goal} within the budget, so this run says "
            f"nothing about the {paper}.")


def _delta_sentences(exp: Experiment, first: dict, second: dict) -> list[str]:
    """The first variant's error minus the second's, next to the paper's (none without
    both means)."""
    if first["top1_err_mean"] is None or second["top1_err_mean"] is None:
        return []
    d1 = 100 * (first["top1_err_mean"] - second["top1_err_mean"])
    d5 = 100 * (first["top5_err_mean"] - second["top5_err_mean"])
    p1, p5 = exp.delta
    paper5 = f"{p5:+.1f}" if p5 == p5 else "not given"
    (n1, _), (n2, _) = exp.variants[:2]
    return [f"Measured difference {n1} minus {n2}: {d1:+.1f} top-1 / {d5:+.1f} top-5 points "
            f"(paper: {p1:+.1f} / {paper5})."]


def write_markdown(path: Path, exp: Experiment, result: dict) -> None:
    """results.md: the question, the settings, one table row per variant, the comparisons."""
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
    """curves.png: each variant's smoothed training error (mean over seeds) and the target."""
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
    """(the experiment's own flags, the trainer's flags after ``--``, unparsed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = Parser(module=PROG,
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
    return p.parse_args(argv), extra  # argparse's usage errors exit with 2


@dataclass(frozen=True)
class Plan:
    """One invocation, resolved from the command line before any work is done."""

    exp: Experiment        # its variants narrowed to --variants
    complete: bool         # every variant of the experiment runs: the comparisons are made
    out: Path
    data: Path
    make_demo: bool        # no --data: the demo set is generated in OUT/demo_data
    demo: bool
    base: TrainConfig      # every run's settings, but for its switch, seed and folder
    budget: str            # the budget per run, in words
    seeds: int
    smooth: int
    keep_checkpoints: bool


def make_plan(a: argparse.Namespace, extra: list[str]) -> Plan:
    """The experiment's :class:`Plan`: its own flags ``a`` and the trainer's flags ``extra``
    (parsed here, once, over the experiment's settings; they win over them)."""
    out = Path(a.out or f"runs/experiments/{a.name}")
    demo = a.demo or a.data is None
    data = out / "demo_data" if a.data is None else Path(a.data)
    exp = chosen_variants(EXPERIMENTS[a.name], a.variants)
    settings, budget = shared_settings(a, demo, data)
    return Plan(exp=exp, complete=exp.variants == EXPERIMENTS[a.name].variants, out=out,
                data=data, make_demo=a.data is None, demo=demo,
                base=parse_config(extra, base=settings), budget=budget, seeds=a.seeds,
                smooth=a.smooth, keep_checkpoints=a.keep_checkpoints)


def chosen_variants(exp: Experiment, spec: str | None) -> Experiment:
    """``exp`` with only the variants ``--variants`` names (all without it)."""
    if not spec:
        return exp
    wanted = [v.strip() for v in spec.split(",") if v.strip()]
    names = [n for n, _ in exp.variants]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise UsageError(f"--variants: {exp.name} has {', '.join(names)}; "
                         f"not {', '.join(unknown)}")
    return replace(exp, variants=tuple(v for v in exp.variants if v[0] in wanted))


def shared_settings(a: argparse.Namespace, demo: bool, data: Path) -> tuple[dict, str]:
    """(the trainer settings every run shares, the budget per run in words)."""
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
    return settings, budget


def prepare_data(plan: Plan) -> int:
    """Create OUT, generate the demo set if there is no --data, check the dataset's folders;
    its number of classes."""
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.make_demo:
        print(f"{PROG}: no --data: using the generated demo set in {plan.data}", file=sys.stderr)
        make_demo_dataset(plan.data, seed=0)
    if not (plan.data / "train").is_dir() or not (plan.data / "val").is_dir():
        raise UsageError(f"--data {plan.data} needs train/<class>/ and val/<class>/ folders")
    return sum(1 for d in (plan.data / "train").iterdir() if d.is_dir())


def run_all(plan: Plan, num_classes: int) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
    """Train every variant with every seed: (variant -> its runs' summaries, run -> the
    command that reproduces it)."""
    runs: dict[str, list[dict]] = {}
    commands: dict[str, list[str]] = {}
    for seed in range(plan.seeds):
        for name, switch in plan.exp.variants:
            summary, commands[f"{name}-seed{seed}"] = run_one(plan, name, switch, seed,
                                                             num_classes)
            runs.setdefault(name, []).append(summary)
    return runs, commands


def run_one(plan: Plan, name: str, switch: dict[str, Any], seed: int,
            num_classes: int) -> tuple[dict, list[str]]:
    """Train one variant with one seed in OUT/<variant>-seed<k> (afresh) and read its
    numbers: (its summary, the command that reproduces it)."""
    run_out = plan.out / f"{name}-seed{seed}"
    if run_out.exists():
        shutil.rmtree(run_out)  # a fresh run: metrics.jsonl appends otherwise
    cfg = plan.base.with_settings(**switch, seed=seed, out=str(run_out))
    print(f"{PROG}: {plan.exp.name}: {name} seed {seed}: train {' '.join(cfg.to_argv())}",
          file=sys.stderr)
    diverged = None
    try:
        train(cfg)
    except Diverged as e:
        diverged = str(e)  # NaN/inf loss or weights: a result of this variant
        print(f"{PROG}: {name} seed {seed} diverged: {e}", file=sys.stderr)
    fv = final_val(cfg) if diverged is None else dict.fromkeys(
        ("step", "top1_err", "top5_err", "loss", "n"))
    summary = summarise_run(run_out, target=plan.exp.target, window=plan.smooth,
                            num_classes=num_classes, batch=cfg.optim.batch_size, final=fv)
    summary.update(seed=seed, diverged=diverged)
    if not plan.keep_checkpoints:
        for pt in run_out.glob("*.pt"):
            pt.unlink()
    return summary, ["python", "-m", "split_alexnet.train", *cfg.to_argv()]


def make_result(plan: Plan, runs: dict[str, list[dict]], commands: dict[str, list[str]],
                num_classes: int, wall_seconds: float) -> dict:
    """Everything results.json holds: the experiment, its settings, every run and the
    summary per variant."""
    exp = plan.exp
    switched = {k for _, v in exp.variants for k in v}
    summary = {name: aggregate(runs[name]) for name, _ in exp.variants}
    return {
        "experiment": exp.name, "question": exp.question, "claim": exp.claim,
        "setting_note": exp.setting_note, "paper": exp.paper,
        "paper_delta_top1_top5": list(exp.delta) if exp.delta else None,
        "target": exp.target,
        "chance_threshold": runs[exp.variants[0][0]][0]["reached"]["chance"]["threshold"],
        "num_classes": num_classes,
        "settings": {"data": str(plan.data), "demo": plan.demo, "budget": plan.budget,
                     "seeds": plan.seeds, "smooth": plan.smooth,
                     "common_flags": plan.base.to_argv(
                         leave_out=("config", "out", "seed", *switched)),
                     "variants": {n: to_flags(v) for n, v in exp.variants}},
        "commands": commands,
        "wall_seconds": wall_seconds,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": str(torch.__version__),
        "summary": summary,
        "runs": runs,
        "comparisons": comparisons(exp, summary) if plan.complete else [],
    }


def write_outputs(out: Path, exp: Experiment, result: dict) -> None:
    """results.json, results.md and curves.png in OUT; results.md on stdout too."""
    write_json(out / "results.json", result, indent=1)
    write_markdown(out / "results.md", exp, result)
    write_png(out / "curves.png", exp, result)
    print((out / "results.md").read_text())
    print(f"{PROG}: wrote {out / 'results.md'}, {out / 'curves.png'}, {out / 'results.json'}",
          file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one experiment: every flag checked first, then the data, the runs, the outputs."""
    plan = make_plan(*parse_args(argv))
    num_classes = prepare_data(plan)
    t_start = time.monotonic()
    runs, commands = run_all(plan, num_classes)
    result = make_result(plan, runs, commands, num_classes, time.monotonic() - t_start)
    write_outputs(plan.out, plan.exp, result)
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))


__all__ = ["EXPERIMENTS", "Experiment", "StepRatio", "main", "cli", "comparisons",
           "chance_threshold", "first_crossing", "smooth", "summarise_run", "aggregate"]
