"""The ``moalign`` command line: flags are generated from the config dataclasses, one per command.

Every command accepts ``--config FILE`` (a JSON config, or a run's ``.meta.json``); flags override it.
Bad input prints one line ``moalign: error: ...`` and exits with status 2.

``moalign train NAME`` commands come from :data:`TRAIN_COMMANDS` (one line each). Their flags are built
when the command is parsed (so other commands never import the training stack): a config that subclasses
``transformers.TrainingArguments`` (directly or through a TRL config) gets its flags from transformers'
``HfArgumentParser`` (every TrainingArguments field is a flag, as ``--name_with_underscores`` or
``--name-with-dashes``); other config dataclasses use :func:`add_dataclass_flags`. For the former,
``--config FILE`` is applied in a first pass as the parser's defaults (a required field given by the file is
no longer required) and the flags are parsed in a second pass, so flags given explicitly override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable

from moalign.config import (
    CompareConfig,
    EvaluateConfig,
    FrontConfig,
    GenerateConfig,
    build_config,
    load_config_file,
)
from moalign.decoding.registry import available_methods
from moalign.errors import MoalignError, SettingError

try:  # transformers is a core dependency; a stub keeps the non-training commands importable without it
    from transformers.hf_argparser import HfArgumentParser
except ImportError:  # pragma: no cover
    HfArgumentParser = argparse.ArgumentParser  # type: ignore[misc,assignment]


# ------------------------------------------------------------------------------------ dataclass -> flags
def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


class _Renamed(argparse.Action):
    """An old flag: using it is a one-line error that names the flag it became."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        raise MoalignError(f"{option_string} was renamed: use {self.new}")


def renamed_keys(cls, values: dict, where: str) -> None:
    """Refuse a config's old field names (``cls.RENAMED``) with one line naming the new one."""
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in values:
            raise MoalignError(f"{where}: {old!r} was renamed {new!r} (flag --{new.replace('_', '-')})")


def _group_of(f: dataclasses.Field, method: str | None) -> str | None:
    """The ``--help`` group of a config field: the shared settings' groups, the chosen method's own settings,
    the settings several methods have (compare, front); ``None``: hidden (another method's, with ``generate
    --method M``: still parsed, so that giving it is the one-line error that names its method)."""
    from moalign.config import SETTING_GROUPS

    for g in SETTING_GROUPS:
        if f.name in g.__dataclass_fields__:
            return (g.__doc__ or g.__name__).split("\n")[0]
    owners = f.metadata.get("methods")
    if owners is None:
        return ""
    if method is None:
        return "methods' own settings (each applies to the methods it names)"
    return f"{method}'s own settings" if method in owners else None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, method: str | None = None) -> None:
    """Every field of ``cls`` a flag, in ``--help`` groups (:func:`_group_of`); ``method``: ``generate`` for that
    method, whose help lists its own settings and the shared ones, not other methods'."""
    for old, new in getattr(cls, "RENAMED", {}).items():
        parser.add_argument("--" + old.replace("_", "-"), action=_Renamed, dest="_renamed_" + old,
                            new="--" + new.replace("_", "-"), default=argparse.SUPPRESS)  # fmt: skip
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    own: dict[str, str] = {}  # generate --method M: M's own settings with their help as M declares it
    if method is not None:
        from moalign.decoding.registry import get_method

        args = get_method(method).args
        own = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(args)} if args else {}
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": own.get(f.name, f.metadata.get("help", ""))}
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, "", dataclasses.MISSING) and not isinstance(default, bool):
            kw["help"] += f" (default: {default})"
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            kw["choices"] = list(choices() if callable(choices) else choices)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list and f.metadata.get("action") == "append":
            kw["action"] = "append"  # a repeatable flag: --objective a=X --objective b=Y
            kw["type"] = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is list:
            kw["nargs"] = f.metadata.get("nargs", "+")
            kw["type"] = typing.get_args(tp)[0]
        else:
            kw["type"] = tp
        title = _group_of(f, method)
        if title is None:
            kw["help"] = argparse.SUPPRESS
        if title:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            groups[title].add_argument(flag, **kw)
        else:
            parser.add_argument(flag, **kw)
    parser.add_argument("--config", dest="_config", default=None, help="JSON config file (flags override it)")


def chosen_method(argv: list[str]) -> str:
    """The ``--method`` of a ``generate`` command line (or of its ``--config`` file; default ``sample``),
    read before parsing so that ``--help`` shows that method's settings."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--config", default=None)
    known = pre.parse_known_args(argv)[0]
    if known.method:
        return known.method
    if known.config:
        try:
            return str(load_config_file(known.config).get("method", "sample"))
        except (MoalignError, AttributeError):
            pass
    return "sample"


def is_hf_config(cls) -> bool:
    """Whether a config class subclasses ``transformers.TrainingArguments`` (checked without importing it)."""
    return any(
        b.__name__ == "TrainingArguments" and b.__module__.startswith("transformers") for b in cls.__mro__
    )


def _init_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def hf_config_from_namespace(cls, args: argparse.Namespace):
    """Instantiate a TrainingArguments-based config from parsed flags (``--config`` already applied)."""
    values = {k: v for k, v in vars(args).items() if k in _init_fields(cls)}
    try:
        return cls(**values)
    except MoalignError:
        raise
    except (ValueError, TypeError) as e:  # TrainingArguments' own checks; one line
        raise MoalignError(f"invalid {cls.__name__}: {' '.join(str(e).split())}") from None


def config_file_values(cls, path: str) -> dict:
    """A config file's values for ``cls``: old field names upgraded (``cls.upgrade_config``), the token
    placeholders of ``TrainingArguments.to_dict()`` dropped, unknown names refused."""
    values = load_config_file(path)
    if not isinstance(values, dict):
        raise MoalignError(f"config file {path} must hold a JSON object")
    upgrade = getattr(cls, "upgrade_config", None)
    if upgrade is not None:
        values = upgrade(values)
    values = {k: v for k, v in values.items() if not (k.endswith("_token") and v == f"<{k.upper()}>")}
    unknown = sorted(set(values) - _init_fields(cls))
    if unknown:
        raise MoalignError(f"{path}: unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return values


def config_from_args(cls, args: argparse.Namespace, **defaults):
    if is_hf_config(cls):
        return hf_config_from_namespace(cls, args)
    values = dict(defaults)
    if getattr(args, "_config", None):
        loaded = load_config_file(args._config)
        renamed_keys(cls, loaded, args._config)
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("func", "command", "what")})
    return build_config(cls, values)


# ------------------------------------------------------------------------------------------- commands
def _print_result(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())


def cmd_generate(args) -> None:
    from moalign.generate import generate

    cfg = config_from_args(GenerateConfig, args)
    if not cfg.out:
        raise MoalignError("--out is required (a JSONL file)")
    recs = generate(cfg)
    print(f"wrote {len(recs)} new record(s) to {cfg.out}", file=sys.stderr)


def cmd_evaluate(args) -> None:
    from moalign.evaluation.evaluate import evaluate_files

    cfg = config_from_args(EvaluateConfig, args)
    result = evaluate_files(cfg)
    _print_result(result, cfg.json)
    if cfg.plot:
        from moalign.evaluation.report import plot_comparison

        plot_comparison(result, cfg.plot)
        print(f"plot: {cfg.plot}", file=sys.stderr)


def cmd_compare(args, demo: bool = False) -> None:
    from moalign.compare import compare, demo_config
    from moalign.evaluation.report import read_out

    defaults = dataclasses.asdict(demo_config()) if demo else {}
    cfg = config_from_args(CompareConfig, args, **defaults)
    result = compare(cfg)
    if demo:
        from moalign.compare import DEMO_NOTE

        print(DEMO_NOTE + "\n")
    print(result.table())
    said = read_out(result)
    if said:
        print("\n" + textwrap.fill(said, width=110))
    print(f"\nruns, summary.json and comparison.png in {cfg.out_dir}")


def cmd_front(args) -> None:
    from moalign.front import front, front_table

    cfg = config_from_args(FrontConfig, args)
    result = front(cfg)
    print(front_table(result))
    print(f"\nruns, front.json, front.md and front.png in {cfg.out_dir}")


def cmd_methods(args) -> None:
    from moalign.decoding.registry import methods_table

    print(methods_table())


def cmd_objectives(args) -> None:
    from moalign.objectives.base import available_objectives

    for name in available_objectives():
        print(name)


def cmd_stats(args) -> None:
    from moalign.stats import StatsConfig, compute_stats

    cfg = config_from_args(StatsConfig, args)
    stats = compute_stats(cfg)
    print(json.dumps(stats.to_dict(), indent=2))


def cmd_plot_weights(args) -> None:
    from moalign.evaluation.report import plot_weight_trajectory
    from moalign.records import read_records

    recs = read_records(args.input)
    rec = next((r for r in recs if args.record in (None, r.get("record_id"))), None)
    if rec is None:
        raise MoalignError(f"no record {args.record!r} in {args.input}")
    weights = [b["weights"] for b in rec.get("trace", []) if "weights" in b]
    if not weights:
        raise MoalignError(f"record {rec.get('record_id')} has no per-block weights (is it an rmod run?)")
    names = list(rec["scores"])
    plot_weight_trajectory(weights, names, args.out, title=f"RMOD weights, prompt {rec.get('record_id')}")
    print(args.out)


def _train_command(module: str, cfg_name: str, fn_name: str) -> Callable:
    def run(args) -> None:
        import importlib

        mod = importlib.import_module(module)
        cfg = config_from_args(getattr(mod, cfg_name), args)
        result = getattr(mod, fn_name)(cfg)
        if int(os.environ.get("RANK", "0")) == 0:  # accelerate launch: print once
            print(json.dumps(result, indent=2, default=str))

    return run


def _option_given(action: argparse.Action, argv: list[str]) -> bool:
    return any(a == o or a.startswith(o + "=") for a in argv for o in action.option_strings)


class TrainArgumentParser(HfArgumentParser):
    """The parser of one ``moalign train NAME`` command (``parser_class`` of the ``train`` subparsers).

    ``config=(module, class name)``: the config class, imported and turned into flags on first use (parse or
    ``--help``): ``HfArgumentParser`` for TrainingArguments-based configs, :func:`add_dataclass_flags` for
    the others. ``--config FILE`` + flags: see the module docstring. Parse errors raise :class:`MoalignError`
    (``main`` prints one line and returns 2).
    """

    def __init__(self, *args, config: tuple[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._config_ref = config
        self.config_class = None

    def _ensure_flags(self) -> None:
        if self.config_class is not None or self._config_ref is None:
            return
        import importlib

        module, name = self._config_ref
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise MoalignError(f"{self.prog} is not available here: {e}") from None
        self.config_class = cls
        if is_hf_config(cls):
            self._add_dataclass_arguments(cls)  # HfArgumentParser: every field, TrainingArguments' included
            self.add_argument("--config", dest="_config", default=None,
                              help="JSON config file or a run's saved config (flags given override it)")  # fmt: skip
        else:
            add_dataclass_flags(self, cls)

    def format_help(self) -> str:
        self._ensure_flags()
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        self._ensure_flags()
        argv = list(sys.argv[1:] if args is None else args)
        cls = self.config_class
        if cls is None or not is_hf_config(cls):
            return super().parse_known_args(argv, namespace)
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config", dest="_config", default=None)
        path = pre.parse_known_args(argv)[0]._config
        if not path:
            return super().parse_known_args(argv, namespace)
        values = config_file_values(cls, path)
        saved = [(a, a.default, a.required) for a in self._actions]
        try:
            for a in self._actions:
                if a.dest not in values:
                    continue
                a.required = False
                if isinstance(a, argparse._AppendAction) and _option_given(a, argv):
                    continue  # a repeated flag given on the command line replaces the file's list
                a.default = values[a.dest]
            return super().parse_known_args(argv, namespace)
        finally:
            for a, default, required in saved:
                a.default, a.required = default, required

    def error(self, message: str):
        raise MoalignError(" ".join(message.split()))  # main() prints it as one line, exit status 2


# (subcommand, module, config class, function, help). A new trainer is one more line here: its config
# (a TrainingArguments/TRL config subclass, or a plain dataclass) becomes the flags, the function gets the config.
TRAIN_COMMANDS = [
    ("reward", "moalign.training.reward", "TrainRewardConfig", "train_reward",
     "train a Bradley-Terry reward model for one objective from preference pairs"),
    ("values", "moalign.training.values", "TrainValuesConfig", "train_values",
     "train CD-FUDGE value heads on the policy's hidden states (for cd/rmod --values PATH)"),
    ("distill", "moalign.training.distill", "DistillConfig", "train_distill",
     "fine-tune the policy on its own RMOD outputs (distilled RMOD)"),
    ("dpo", "moalign.training.dpo", "MultiObjectiveDPOConfig", "train_dpo",
     "multi-objective DPO with a gradient combiner (mgda-decoupled, mgda, linear, ...)"),
    ("grpo", "moalign.training.grpo", "IAMAConfig", "train_grpo",
     "IAMA: non-linear GRPO so that best-of-N / tilting per criterion serves every criterion (--nonlinear off: GRPO)"),
]  # fmt: skip


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moalign", description="Multi-objective alignment of language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    argv = list(sys.argv[1:] if argv is None else argv)
    method = chosen_method(argv[1:]) if argv[:1] == ["generate"] else "sample"
    p = sub.add_parser("generate", help="decode responses with one method and score them",
                       description="Decode responses with one method and score them. Each method's own settings: "
                                   "moalign generate --method NAME --help (this help: the method "
                                   f"{method!r}).")  # fmt: skip
    add_dataclass_flags(p, GenerateConfig, method=method if method in available_methods() else None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="per-objective, worst-case and win-rate metrics of runs")
    add_dataclass_flags(p, EvaluateConfig)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="several methods on the same prompts, evaluated and plotted")
    add_dataclass_flags(p, CompareConfig)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("front", help="Pareto fronts: weighted methods swept over the simplex, others as points")
    add_dataclass_flags(p, FrontConfig)
    p.set_defaults(func=cmd_front)

    p = sub.add_parser("demo", help="compare methods on the bundled policy and objectives (about 90 s on two CPU cores)")
    add_dataclass_flags(p, CompareConfig)
    p.set_defaults(func=lambda a: cmd_compare(a, demo=True))

    p = sub.add_parser("methods", help="the registered decoding methods and their own settings (markdown)")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("objectives", help="list the registered objectives")
    p.set_defaults(func=cmd_objectives)

    from moalign.stats import StatsConfig

    p = sub.add_parser("stats", help="z-score statistics of objectives on policy samples (for --normalize)")
    add_dataclass_flags(p, StatsConfig)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("plot-weights", help="plot the per-block RMOD weights of one response")
    p.add_argument("--input", required=True, help="an rmod run (JSONL)")
    p.add_argument("--record", default=None, help="record_id (default: the first record)")
    p.add_argument("--out", required=True, help="PNG path")
    p.set_defaults(func=cmd_plot_weights)

    train = sub.add_parser("train", help="train reward models, value heads, distilled or DPO policies")
    tsub = train.add_subparsers(dest="what", required=True, parser_class=TrainArgumentParser)
    for name, module, cfg_name, fn_name, help_ in TRAIN_COMMANDS:
        p = tsub.add_parser(name, help=help_, description=help_, config=(module, cfg_name))
        p.set_defaults(func=_train_command(module, cfg_name, fn_name))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        args.func(args)
    except SettingError as e:  # raised from Python naming the parameter: here, its flag
        print(f"moalign: error: {e.as_flag()}", file=sys.stderr)
        return 2
    except MoalignError as e:
        print(f"moalign: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"moalign: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moalign: interrupted (records written so far are kept; rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
