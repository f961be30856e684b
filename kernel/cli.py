"""What the command-line programs share: how a command's outcome becomes an exit code.

Errors of the project's family print one line, ``PROG: error: MESSAGE``, and exit with the code
of their status (kernel/errors.py, docs/cli.md#exit-codes). A reader that stops early (`| head`)
ends the command quietly, as it ends other Unix tools.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from modelfleet.kernel.errors import EXIT_BROKEN_PIPE, EXIT_CODES, ModelfleetError


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run ``command`` (parse and act) and return the process's exit code."""
    try:
        try:
            return command()
        finally:
            # Inside the try: what is still buffered (argparse's --help too) meets a closed
            # pipe here, not in the interpreter's exit, which would print a traceback.
            sys.stdout.flush()
    except ModelfleetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CODES[exc.status]
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


def _drop_stdout() -> None:
    """Point stdout at /dev/null: the interpreter flushes it once more on its way out."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
