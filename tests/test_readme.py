"""The README's quickstarts, run as written: readers paste them, so they must work as they are.

Both blocks run in one bash shell, as the README says, with real agent and hub processes. Only
what cannot work on a shared test machine is changed: the install line (the test's own venv
is already installed), the scratch folder (a temporary one) and the ports (free ones).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.procs import ROOT, free_port

README = ROOT / "README.md"
INSTALL = "make .venv/.installed && source .venv/bin/activate"
SCRATCH = "/tmp/modelfleet-quickstart"
WAIT_LOOP = re.compile(r"^for i in \$\(seq \d+\); do (.+?) && break; sleep [\d.]+; done$", re.M)


def sh_block(text: str, heading: str) -> str:
    """The first ```sh block under the markdown heading ``## heading``."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, f"README.md: no ```sh block under '## {heading}'"
    return m.group(1)


def test_readme_quickstarts_run_as_written(tmp_path: Path) -> None:
    text = README.read_text()
    standalone, fleet = sh_block(text, "Quickstart"), sh_block(text, "Fleet quickstart")
    assert INSTALL in standalone and SCRATCH in standalone
    script = "\n".join(
        (
            "set -euo pipefail",
            # What the reader stops by hand (the README says how): here, at any exit.
            "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",
            standalone.replace(INSTALL, f"export PATH={Path(sys.executable).parent}:$PATH"),
            "echo '=== fleet quickstart'",
            fleet,
        )
    ).replace(SCRATCH, str(tmp_path / "quickstart"))
    # A wait loop that runs out falls through and the script goes on: a condition that can
    # never hold (a stale grep pattern) made the quickstart sit out every loop and still pass.
    # Here the condition is checked once more after each loop, and a miss ends the script.
    # Without pipefail, as in the reader's shell: `grep -q` leaves at its match, and a CLI still
    # writing then exits 141 (EPIPE), which pipefail would count as a miss.
    n = itertools.count(1)
    script, waits = WAIT_LOOP.subn(
        lambda m: (
            f"{m.group(0)}\n(set +o pipefail; {m.group(1)}) "
            f"|| {{ echo 'TIMED OUT: wait loop {next(n)}'; exit 1; }}"
        ),
        script,
    )
    assert waits == 4, script  # hub and agent ready, v2 swapped in, v1 on the fleet agent
    ports = {p: free_port() for p in sorted(set(re.findall(r"127\.0\.0\.1:(\d+)", script)))}
    assert len(ports) >= 6, ports  # agent, its metrics and HTTP, hub, enrollment, fleet agent
    script = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{ports[m.group(1)]}", script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
    log = tmp_path / "quickstart.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=240)
        finally:
            # The whole session: bash and whatever it left in the background.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    output = log.read_text(errors="replace")
    assert rc == 0, output[-6000:]
    first, second = output.split("=== fleet quickstart\n")

    assert "wrote model.onnx" in first and "wrote model_v2.onnx" in first
    assert "created models/fraud/1" in first and "created staging/fraud/2" in first
    # infer.py three times: v1, v2 after the swap, v1 again after the rollback.
    answers = [line for line in first.splitlines() if line.startswith("[[")]
    assert len(answers) == 3, first[-4000:]
    assert answers[0] == answers[2] != answers[1], answers
    assert re.search(r"^fraud +2 +1 ", first, re.M), first[-3000:]  # status: active 2, previous 1
    assert "fraud: rolled back from version 2 to 1" in first
    # The curl lines: readiness, then one answer as JSON from the HTTP port.
    assert "\nready\n" in first, first[-4000:]
    http = [line for line in first.splitlines() if line.startswith('{"model_name":"fraud"')]
    assert len(http) == 1 and '"shape":[1,3]' in http[0], first[-4000:]

    assert re.search(r"enrolled as berlin-1-[0-9a-f]{6}", second), second[-3000:]
    assert "published fraud v1" in second
    assert "desired on 1 agent(s) matching site=berlin" in second
    assert re.search(r"^berlin-1-\w+ +active .* fraud +1 +1 .*v1 passed", second, re.M), second
    assert re.search(r"^fraud +1 ", second, re.M), second[-3000:]
    assert "Traceback" not in output, output[-6000:]
