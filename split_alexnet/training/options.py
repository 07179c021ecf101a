"""The training command line: flags and TOML files into a :class:`TrainConfig` (the run's
settings) and a :class:`Command` (this invocation's own switches, never saved with the run).

Flags are flat (``--lr``, whatever the setting's section); a TOML file given with ``--config``
may set them flat or under their section's table (``[optim] lr = 0.02``), with dashes or
underscores (a ``.json`` file, such as a run's ``config.json``, the same way). With
``--resume`` the run's own settings are the base and the settings given are applied over
them (``runfolder.settings_for_resume``). Order of precedence, later wins: defaults <- ``--recipe`` <- the ``--demo``
preset <- the ``--finetune`` preset <- a calling tool's settings <- TOML file <- command
line. The recipe is the one named last in that order; a preset applies when its switch is
set anywhere. The parser, its help and its checks come from the fields' metadata
(``training/config.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from split_alexnet.training.config import (FLAGS, PROG, SECTIONS, TrainConfig, bounds,
                                           check_value, flag_name, kind, negatable)
from split_alexnet.training.optim import SCHEDULES
from split_alexnet.training.recipes import PRESETS, recipe_settings, values
from split_alexnet.training.runfolder import saved_settings, settings_for_resume
from split_alexnet.utils.cli import Parser, UsageError
from split_alexnet.utils.fileio import read_bounded
from split_alexnet.utils.flags import Number, check_number

try:  # Python 3.11+; on 3.10 the optional dependency tomli reads --config files
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]


def switch(default: Any, help: str, **bounds_: Any) -> Any:
    """A field of :class:`Command`: its help text and numeric range as metadata."""
    return field(default=default, metadata={"help": help, **bounds_})


@dataclass(frozen=True)
class Command:
    """What this invocation of the trainer does with the run, besides its settings: none of
    these is saved with the run, and a resume may give any of them."""

    config: str | None = switch(None, "A TOML file with any of the run's settings (flat, or "
                                      "under their section: [optim] lr = 0.02; dashes or "
                                      "underscores); flags on the command line win.")
    resume: str | None = switch(None, "'auto' (OUT/last.pt, falling back to the newest good "
                                      "epoch checkpoint) or a path.")
    resume_lr: float | None = switch(None, "With --resume: continue at this learning rate "
                                           "instead of the checkpoint's; recorded in "
                                           "metrics.jsonl as an \"lr_change\" record.",
                                     above=0, max=3.4028234663852886e38)
    overwrite: bool = switch(False, "Start a new run in an --out that already holds one, "
                                    "deleting its checkpoints, metrics.jsonl, curves.png and "
                                    "config.json (without it such an --out is refused).")
    demo: bool = switch(False, "Generate the demo dataset under OUT/demo_data and train on it "
                               "with the demo preset, both towers on the CPU.")
    finetune: bool = switch(False, "Caffe's fine-tuning recipe (models/finetune_flickr_style), "
                                   "printed with its sources; needs --init-from. Flags on the "
                                   "command line win.")
    print_recipe: bool = switch(False, "Print the recipe's resolved settings with their "
                                       "sources and exit, doing nothing else.")
    plan: bool = switch(False, "Print what the run will do (steps, schedule, checkpoints and "
                               "their disk, memory per device and projected time from a few "
                               "real steps) and exit, writing nothing into --out.")
    plan_steps: int = switch(5, "With --plan: time this many training steps (after one "
                                "warm-up step) for the projected time.", min=1, max=10_000)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and _COMMAND_KINDS[f.name] in (int, float):
                check_number(flag_name(f.name), value, _COMMAND_KINDS[f.name], **bounds(f))
        if self.overwrite and self.resume:
            raise UsageError("give --resume (continue the run in --out) or --overwrite (delete "
                             "it and start over), not both")
        if self.resume_lr is not None and not self.resume:
            raise UsageError("--resume-lr sets the learning rate of a resumed run: it needs "
                             "--resume")
        if self.plan and self.resume:
            raise UsageError("--plan plans a new run; leave out --resume")


def _command_kinds() -> dict[str, type]:
    out = {}
    for name, hint in typing.get_type_hints(Command).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        out[name] = args[0] if args[0] in (int, float, bool) else str
    return out


_COMMAND_KINDS = _command_kinds()
#: The largest --config file read (a TOML of every setting is about 4 KB).
MAX_CONFIG_BYTES = 1 << 20
COMMAND_FLAGS = tuple(f.name for f in fields(Command))


def _add(p: argparse.ArgumentParser, name: str, f: dataclasses.Field, k: type) -> None:
    """One flag from a field's metadata: a switch (with ``--no-NAME`` when on by default), a
    number (checked by ``utils.flags.Number``) or a string."""
    choices = f.metadata.get("choices")
    help_ = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
    help_ = f"{help_} (default: {f.default})".replace("%", "%%")
    if k is bool:
        p.add_argument(flag_name(name), action="store_true", help=help_)
        if name in FLAGS and negatable(name):
            p.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                           help=f"the opposite of {flag_name(name)}")
    elif name == "resume":
        p.add_argument("--resume", nargs="?", const="auto", metavar="PATH", help=help_)
    elif k in (int, float):
        p.add_argument(flag_name(name), action=Number, kind=k, metavar=name.upper(),
                       help=help_, **bounds(f))
    else:
        metavar = "{" + ",".join(choices) + "}" if choices else \
            "{" + ",".join(SCHEDULES) + "}" if name == "lr_schedule" else name.upper()
        p.add_argument(flag_name(name), metavar=metavar, help=help_)


def build_parser() -> argparse.ArgumentParser:
    """Every setting and switch as a flag; unset flags are left out of the namespace."""
    p = Parser(
        module=PROG,
        description="Train the 2012 two-tower AlexNet with the paper's recipe.",
        argument_default=argparse.SUPPRESS)
    for name, (_, f) in FLAGS.items():
        _add(p, name, f, kind(f))
    group = p.add_argument_group("this command (not saved with the run)")
    for f in fields(Command):
        _add(group, f.name, f, _COMMAND_KINDS[f.name])  # type: ignore[arg-type]
    return p


def load_toml(path: str) -> dict[str, Any]:
    """A settings file's settings, flat: TOML, or JSON when the name ends in ``.json`` (a run's
    ``config.json``); top-level keys and keys under a section's table, and the preset switches
    (``demo``, ``finetune``); each checked for type and range."""
    if path.endswith(".json"):
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise UsageError(f"config file {path} is not a JSON object of settings")
        return _settings_of(raw, path)
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise UsageError("--config needs Python 3.11+ or 'pip install tomli'")
    try:
        raw = tomllib.loads(read_bounded(path, MAX_CONFIG_BYTES, "config file").decode())
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {e.start}); TOML files "
                         "are UTF-8") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    return _settings_of(raw, path)


def _settings_of(raw: dict[str, Any], path: str) -> dict[str, Any]:
    where = f"config file {path}: "
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                sname = sub.replace("-", "_")
                if sname not in FLAGS or FLAGS[sname][0] != name:
                    raise UsageError(f"{where}unknown setting {sub!r} in [{key}]")
                out[sname] = check_value(sname, v, where)
        elif name in PRESETS:
            if not isinstance(value, bool):
                raise UsageError(f"{where}{key} must be true or false, got {value!r}")
            out[name] = value
        elif name in FLAGS:
            out[name] = check_value(name, value, where)
        else:
            raise UsageError(f"{where}unknown setting {key!r}")
    return out


def demo_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """--demo: without --data it trains on OUT/demo_data, and without a device flag both
    towers run on the CPU."""
    out = {}
    if settings.get("data") is None:
        out["data"] = str(Path(settings.get("out", FLAGS["out"][1].default)) / "demo_data")
    if settings.get("gpus") is None and settings.get("devices") is None:
        out["devices"] = "cpu,cpu"
    return out


def parse_command(argv: Sequence[str] | None = None, *,
                  base: dict[str, Any] | None = None) -> tuple[TrainConfig, Command]:
    """The run's settings and this command's switches from ``argv``, in the order of
    precedence of the module docstring, checked once."""
    try:
        ns = vars(build_parser().parse_args(argv))
    except SystemExit as e:  # argparse already printed one line of usage error
        if e.code not in (0, None):
            raise SystemExit(2) from None
        raise
    cmd_values = {k: ns.pop(k) for k in COMMAND_FLAGS if k in ns}
    base = dict(base or {})
    from_file = load_toml(cmd_values["config"]) if cmd_values.get("config") else {}
    for name in PRESETS:  # a preset switch may come from the file or the calling tool
        on = cmd_values.get(name, from_file.pop(name, base.pop(name, False)))
        cmd_values[name] = on
    cmd = Command(**cmd_values)
    given = {**base, **from_file, **ns}
    if cmd.resume:
        settings = resume_settings(cmd.resume, given)
    else:
        recipe = given.get("recipe", "paper")
        settings = recipe_settings(check_value("recipe", recipe))
        for name, preset in PRESETS.items():  # --demo, then --finetune
            if getattr(cmd, name):
                settings.update(values(preset))
        settings.update(given)
    if cmd.demo:
        settings.update(demo_defaults(settings))
    if cmd.finetune and settings.get("init_from") is None:  # before the preset's own flags
        raise UsageError("--finetune needs --init-from CKPT, the checkpoint to start from")
    return TrainConfig.from_flat(settings), cmd


def resume_settings(spec: str, given: dict[str, Any]) -> dict[str, Any]:
    """--resume: the run's own settings (``runfolder.saved_settings``) with the ``given`` ones
    applied (a different value of one that defines the run is refused); the recipe's and
    presets' values are not applied again (the run's settings hold them). The resume says
    which settings it changed once it holds the run folder (``checkpoint.restore``)."""
    out = Path(given.get("out", FLAGS["out"][1].default))
    saved, where = saved_settings(out, spec)
    return settings_for_resume(saved, given, where)


def parse_config(argv: Sequence[str] | None = None, *,
                 base: dict[str, Any] | None = None) -> TrainConfig:
    """The run's settings from ``argv`` (:func:`parse_command` without the switches)."""
    return parse_command(argv, base=base)[0]
