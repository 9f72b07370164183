"""The one command that checks everything: ``python3 tools/check.py``.

On a fresh Debian machine with CPython 3.11, 3.12 and 3.13 (pyenv's or the system's) it:

1. provisions Wine and the Windows CPythons 3.11/3.12/3.13 (``tools/winpy.py``), and Debian's
   HAProxy and nginx for the tests behind a load balancer (``tools/haproxy.py``,
   ``tools/nginx.py``);
2. makes a virtual environment per native CPython under ``.cache/venv/`` with the ``dev``
   extra of ``pyproject.toml`` (redone only when the requirements change);
3. runs ``ruff`` and ``mypy``;
4. runs the test suite natively on Linux CPython 3.11, 3.12, 3.13; each native run also drives
   the CLI under Wine on the Windows CPython of the same version (``--wine-python``);
5. runs the whole test suite on Windows CPython 3.11, 3.12, 3.13 under Wine;
6. runs CPython's own ``test_asyncio`` modules on iocp_echo's loop beside the stock loop, on
   every native and Wine CPython (``tools/conformance.py``; its table lands in
   ``.cache/conformance/table.md``): natively a gate (an unlisted test that passes on the
   stock loop and fails on ours fails the check), under Wine a report.

It ends with one line ``N passed, N failed`` over every pytest run, and exits non-zero if any
step failed.  ``--only native`` / ``--only wine`` / ``--versions 3.13`` narrow it down.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import haproxy
import nginx
import winpy

ROOT = winpy.ROOT
VERSIONS = ("3.11", "3.12", "3.13")
#: A pytest run that takes longer than this is hung: kill it rather than eat CI's budget.
RUN_TIMEOUT = 1500
#: pytest's closing line, with or without -q's decoration: "3 passed, 1 failed in 2.0s".
SUMMARY = re.compile(r"^=*\s*(\d+ \w+(?:, \d+ \w+)*) in [\d.]+s", re.MULTILINE)


def say(message: str) -> None:
    print(f"\n=== check: {message}", flush=True)


def find_interpreter(version: str) -> str:
    candidates = sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")),
        key=lambda path: [int(part) for part in re.findall(r"\d+", path.split("/")[-3])],
    )
    found = candidates[-1] if candidates else shutil.which(f"python{version}")
    if found is None:
        raise SystemExit(f"check: CPython {version} not found (pyenv or python{version} on PATH)")
    return found


def dev_requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"]["dev"])


def ensure_venv(version: str, requirements: list[str], name: str | None = None) -> Path:
    """A virtual environment of CPython *version* under .cache/venv/NAME with *requirements*,
    remade only when they change; returns its python."""
    venv = ROOT / ".cache" / "venv" / (name or version)
    python = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    say(f"creating {venv.relative_to(ROOT)} with {', '.join(requirements)}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([find_interpreter(version), "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        check=True,
    )
    stamp.write_text(digest)
    return python


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.failures: list[str] = []
        self.timings: list[tuple[str, float]] = []

    def record(self, name: str, status: int, output: str, seconds: float) -> None:
        self.timings.append((name, seconds))
        summary = SUMMARY.findall(output)
        counts = dict.fromkeys(("passed", "failed", "errors", "error"), 0)
        if summary:
            for number, word in re.findall(r"(\d+) (\w+)", summary[-1]):
                if word in counts:
                    counts[word] += int(number)
        self.passed += counts["passed"]
        bad = counts["failed"] + counts["errors"] + counts["error"]
        if status != 0 and bad == 0:
            bad = 1  # crashed, hung or collected nothing: count the run itself as a failure
        self.failed += bad
        if status != 0:
            self.failures.append(f"{name} (exit {status})")


def run_step(
    results: Results,
    name: str,
    command: list[str],
    env: dict[str, str] | None = None,
    pytest_run: bool = True,
) -> None:
    say(f"{name}: {' '.join(command)}")
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        assert process.stdout is not None
        lines = []
        deadline = time.monotonic() + RUN_TIMEOUT
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
            if time.monotonic() > deadline:
                process.kill()
        status = process.wait()
    except OSError as exc:
        lines, status = [str(exc)], 127
    seconds = time.monotonic() - started
    if pytest_run:
        results.record(name, status, "".join(lines), seconds)
    else:
        results.timings.append((name, seconds))
        if status != 0:
            results.failures.append(f"{name} (exit {status})")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=["native", "wine", "lint", "conformance"], help="run one part only"
    )
    parser.add_argument(
        "--versions",
        default=",".join(VERSIONS),
        help="comma-separated CPython versions (default: all three)",
    )
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for every pytest run")
    options = parser.parse_args()
    versions = [v for v in options.versions.split(",") if v]
    results = Results()
    started = time.monotonic()

    say("provisioning Wine and Windows CPython " + ", ".join(versions))
    for version in versions:
        winpy.provision(version)
    say("provisioning HAProxy")
    haproxy.provision()  # where it cannot be installed, tests/test_haproxy.py says why it skips
    say("provisioning nginx")
    nginx.provision()  # likewise tests/test_nginx.py; a service the package started is stopped
    venvs = {version: ensure_venv(version, dev_requirements()) for version in versions}

    if options.only in (None, "lint"):
        lint_python = str(venvs[versions[-1]])
        run_step(results, "ruff", [lint_python, "-m", "ruff", "check", "."], pytest_run=False)
        run_step(
            results,
            "ruff format",
            [lint_python, "-m", "ruff", "format", "--check", "."],
            pytest_run=False,
        )
        run_step(results, "mypy", [lint_python, "-m", "mypy"], pytest_run=False)

    if options.only in (None, "native"):
        for version in versions:
            run_step(
                results,
                f"pytest linux-{version}",
                [
                    str(venvs[version]),
                    "-m",
                    "pytest",
                    "-q",
                    "--wine-python",
                    version,
                    *options.pytest_args,
                ],
            )

    if options.only in (None, "wine"):
        for version in versions:
            run_step(
                results,
                f"pytest wine-{version}",
                [
                    sys.executable,
                    str(ROOT / "tools" / "winpy.py"),
                    "--python",
                    version,
                    "-m",
                    "pytest",
                    "-q",
                    *options.pytest_args,
                ],
            )

    if options.only in (None, "conformance"):
        # Natively the step is a gate: a test that passes on the stock loop and fails on ours,
        # unlisted, fails the check.  Under Wine it reports only (--report): CPython's tests
        # there run near their time limits on a loaded machine, and a hang must not block CI.
        for kind, gate in (("linux", True), ("wine", False)):
            run_step(
                results,
                f"conformance {kind}",
                [
                    sys.executable,
                    str(ROOT / "tools" / "conformance.py"),
                    *([] if gate else ["--report"]),
                    "--runtimes",
                    ",".join(f"{kind}-{v}" for v in versions),
                ],
                pytest_run=False,
            )

    say("timings")
    for name, seconds in results.timings:
        print(f"  {name:<22} {seconds:7.1f} s")
    print(f"  {'total':<22} {time.monotonic() - started:7.1f} s")
    if results.failures:
        print("failed steps: " + ", ".join(results.failures))
    print(f"{results.passed} passed, {results.failed} failed", flush=True)
    return 1 if results.failures or results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
