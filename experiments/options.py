"""The experiment scripts' command lines: one option per field of a demo config dataclass (`--max-steps 3`,
`--no-lora`, `--train-lengths 512,1024`), `--methods` and `--seeds`; what is left out keeps the demo's default."""

import argparse
import dataclasses
import sys


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None


def add_config_options(parser: argparse.ArgumentParser, config_class, skip=("extra",)) -> None:
    """An option per field of `config_class`, typed from its default (a tuple of ints: `N,N,...`; a bool: a flag
    and its `--no-` form; None: text); the default is None, meaning "the config's own"."""
    defaults = config_class()
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        default = getattr(defaults, field.name)
        option = {"type": type(default)} if default is not None else {"type": str}
        if isinstance(default, bool):
            option = {"action": argparse.BooleanOptionalAction}
        elif isinstance(default, tuple):
            option = {"type": int_list} if all(isinstance(x, int) for x in default) else {"type": _name_list}
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None, **option)


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def config_overrides(args: argparse.Namespace, config_class) -> dict:
    """The fields given on the command line, lists as tuples (as the config holds them)."""
    overrides = {}
    for field in dataclasses.fields(config_class):
        value = getattr(args, field.name, None)
        if value is not None:
            overrides[field.name] = tuple(value) if isinstance(value, list) else value
    return overrides


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=None, help="Comma-separated method names (default: all of the set).")
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="Seeds, e.g. 0,1,2 (default: 0,1,2).")


def select_methods(parser: argparse.ArgumentParser, methods: dict, text: str | None) -> dict:
    """The methods named in `--methods a,b` (all without it); an unknown name exits 2 listing the set."""
    if not text:
        return methods
    wanted = _name_list(text)
    unknown = [m for m in wanted if m not in methods]
    if unknown or not wanted:
        parser.error(f"--methods {unknown or text!r} not in the set; choose from {', '.join(methods)}.")
    return {m: methods[m] for m in wanted}


def report_bad_settings(script: str, work) -> int:
    """Run `work()`; a `ValueError` (a bad setting: the library refuses it, naming the value, before any work) is one
    line on stderr and exit status 2."""
    try:
        work()
    except ValueError as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        return 2
    return 0
