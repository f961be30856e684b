"""Red-team pass: a damaged DATA/outcomes.sqlite (disk fault, a crash of a copy tool, a hand
edit) when the hub starts. Late labels cannot be fetched again, so the hub must not silently
start over; before this test it died with a raw sqlite3 traceback. It now stops with one line
that names the file and the ways out, and starts again once the file is moved aside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT, HubProcess

pytestmark = pytest.mark.process


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_outcomes_file_stops_the_hub_with_a_clear_error(
    tmp_path: Path, damage: str
) -> None:
    data = tmp_path / "data"
    hub = HubProcess(data, log_path=tmp_path / "hub.log")
    hub.start()
    hub.stop()
    db = data / "outcomes.sqlite"
    if damage == "garbage":
        db.write_bytes(b"not a database " * 500)
    else:
        # A header cut short: SQLite's first page names the format; half of it is no database.
        db.write_bytes(db.read_bytes()[:50] or b"SQLite format 3\x00")
    for side in data.glob("outcomes.sqlite-*"):
        side.unlink()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.hub.cli",
            "--data",
            str(data),
            "serve",
            "--listen",
            hub.url,
            "--enroll-listen",
            f"127.0.0.1:{hub.enroll_port}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert str(db) in r.stderr and "restore" in r.stderr and "move it aside" in r.stderr, r.stderr
    # The way out the message gives works: the hub starts with no outcomes, and its other state.
    db.rename(tmp_path / "outcomes.sqlite.damaged")
    again = HubProcess(data, log_path=tmp_path / "hub2.log")
    again.start()
    try:
        assert db.exists()  # a fresh, empty one
        again.cli("agents", "ls")  # raises unless the hub answers
    finally:
        again.stop()
