"""`trl-opsdl`: a thin command line over the library. Each subcommand parses, calls the library, prints.

Subcommands register themselves in `main()`; each has an `_add_<name>` (arguments) and a `_run_<name>` (work).
"""

import argparse
import sys


# --- build-data / eval (data builders and evaluation) -------------------------------------------------------------


# --- demo ---------------------------------------------------------------------------------------------------------


# --- train (the example script) -----------------------------------------------------------------------------------


# --- plan (memory planner) ----------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(prog="trl-opsdl", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, value in list(globals().items()):
        if name.startswith("_add_") and callable(value):
            value(subparsers)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.run(args, extra) if getattr(args, "accepts_extra", False) else args.run(args)


if __name__ == "__main__":
    sys.exit(main())
