"""``modelfleet-batch``: the batch scoring of Parquet data."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modelfleet-batch",
        description="modelfleet batch scoring of Parquet data. This build has no batch commands "
        "yet: run agents standalone with `modelfleet-agent serve` (see docs/operations.md).",
    )
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
