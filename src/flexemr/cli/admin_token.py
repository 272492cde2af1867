"""`flexemr admin-token`: print the bearer token of the ranker's admin API (model load/unload),
derived from the cluster secret (`--secret-file`, else $FLEXEMR_SECRET)."""

from __future__ import annotations

import argparse
import sys

from flexemr.cli.flags import over
from flexemr.cli.options import add_secret_argument
from flexemr.config import SecurityConfig
from flexemr.config.security import admin_token, load_secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_secret_argument(parser)


def run(args: argparse.Namespace) -> int:
    try:
        secret = load_secret(over(SecurityConfig(), args))
    except (OSError, ValueError) as exc:
        print(f"flexemr admin-token: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print("flexemr admin-token: no secret: give --secret-file or set FLEXEMR_SECRET", file=sys.stderr)
        return 2
    print(admin_token(secret))
    return 0
