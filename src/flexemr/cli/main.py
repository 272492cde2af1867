"""`flexemr` command line. Each subcommand lives in its own module, imported only when used,
so `flexemr --help` stays fast and a command's heavy imports (torch, matplotlib) load on demand.

A subcommand module defines `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from importlib.metadata import version

from flexemr.extras import MissingExtra

COMMANDS: dict[str, str] = {
    "serve": "start a local cluster (embedding servers + ranker) and serve over HTTP",
    "embedding-server": "run one embedding server from a cluster spec file",
    "ranker": "run the ranker from a cluster spec file",
    "spec": "write a cluster spec for given hosts without starting anything",
    "demo": "start a local cluster, send a short load, print a summary",
    "shard": "print the sharding plan for a model",
    "bench": "run a benchmark suite and write a report folder",
    "calibrate": "measure this machine and write a planner calibration file",
    "plan": "find the cheapest cluster that meets a latency target and availability goal, or (--from-stats) "
    "shard a cluster by measured traffic",
    "update": "write rows from a file into a running cluster's embedding servers, as one new version",
    "admin-token": "print the bearer token of the ranker's admin API (from the cluster secret)",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, help text or not, except where there is none to show (None, False)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and _has_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if _has_default(action) else action.help


def _has_default(action: argparse.Action) -> bool:
    return not any(action.default is absent for absent in (None, False, argparse.SUPPRESS))


def _module_name(command: str) -> str:
    return "flexemr.cli." + command.replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="flexemr", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('flexemr')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    try:
        for name, help_text in COMMANDS.items():
            sub_parser = sub.add_parser(
                name, help=help_text, description=help_text, formatter_class=HelpFormatter
            )
            if name == chosen:
                importlib.import_module(_module_name(name)).add_arguments(sub_parser)
        args = parser.parse_args(argv)
        code: int = importlib.import_module(_module_name(args.command)).run(args)
    except MissingExtra as exc:  # an optional part that is not installed: say which extra has it
        print(f"flexemr {chosen}: {exc}", file=sys.stderr)
        return 2
    return code


def entry() -> None:
    """The console script. Every command stops what it started before returning, so interpreter
    finalisation is skipped: native threads (torch's, still winding down) can abort it."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
