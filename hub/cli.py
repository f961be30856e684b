"""``modelfleet-hub``: the fleet hub's command line (registry, signing, rollouts)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modelfleet-hub",
        description="modelfleet hub. This build has no hub commands yet: run agents standalone "
        "with `modelfleet-agent serve` (see docs/operations.md).",
    )
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
