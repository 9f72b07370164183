"""Provision Debian's HAProxy for the tests that run iocp_echo behind it.

Usage::

    python3 tools/haproxy.py            # install haproxy unless it is already there (root)
    python3 tools/haproxy.py --where    # print its path, or why it cannot be used (exit 1)

Why this exists: ``tests/test_haproxy.py`` shows iocp_echo behind a real load balancer, not a
home-made one, so the test command (``tools/check.py``) installs one the way it installs Wine
(``tools/winpy.py``): Debian's ``haproxy`` package through ``apt-get``, idempotently.  Nothing
is done when ``haproxy`` is already installed.  Installing needs root and ``apt-get``; where
either is missing the tests are skipped, and the reason they give is the one
:func:`haproxy_path` states.

``examples/haproxy.cfg`` uses ``http-check send`` (HAProxy 2.2 and later); Debian 12 ships
2.6.  Only the standard library is used, so this runs on any Linux CPython >= 3.11.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

#: Where Debian installs it: /usr/sbin is not on an unprivileged user's PATH.
DEBIAN_PATH = "/usr/sbin/haproxy"
#: ``http-check send`` (the /readyz check of examples/haproxy.cfg) appeared in HAProxy 2.2.
MINIMUM_VERSION = (2, 2)


class HAProxyUnavailable(RuntimeError):
    """HAProxy cannot be used here; the message says why (a test's skip reason)."""


def log(message: str) -> None:
    print(f"haproxy: {message}", file=sys.stderr, flush=True)


def find() -> str | None:
    """The ``haproxy`` executable on PATH, or Debian's, or None."""
    found = shutil.which("haproxy")
    if found is None and os.access(DEBIAN_PATH, os.X_OK):
        found = DEBIAN_PATH
    return found


def parse_version(text: str) -> tuple[int, int] | None:
    """The (major, minor) in ``haproxy -v``'s output ("HAProxy version 2.6.12-1 ..."), if any."""
    match = re.search(r"HA-?Proxy version (\d+)\.(\d+)", text)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def version(executable: str) -> tuple[int, int]:
    """The (major, minor) that ``haproxy -v`` reports; raises HAProxyUnavailable if unreadable."""
    try:
        result = subprocess.run(
            [executable, "-v"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HAProxyUnavailable(f"{executable} -v failed: {exc}") from None
    found = parse_version(result.stdout + result.stderr)
    if found is None:
        raise HAProxyUnavailable(
            f"{executable} -v did not report a version: {result.stdout.strip()[:200]!r}"
        )
    return found


def haproxy_path() -> str:
    """The path of a usable ``haproxy``; raises HAProxyUnavailable saying why there is none."""
    executable = find()
    if executable is None:
        raise HAProxyUnavailable(
            "haproxy is not installed (not on PATH, no /usr/sbin/haproxy): run "
            "'python3 tools/haproxy.py' as root on Debian, or install HAProxy >= 2.2"
        )
    found = version(executable)
    if found < MINIMUM_VERSION:
        raise HAProxyUnavailable(
            f"{executable} is HAProxy {found[0]}.{found[1]}; examples/haproxy.cfg needs "
            f"{MINIMUM_VERSION[0]}.{MINIMUM_VERSION[1]} or later (http-check send)"
        )
    return executable


def cannot_install() -> str | None:
    """Why this machine cannot install the package, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"HAProxy is installed on Linux only (this is {sys.platform})"
    if shutil.which("apt-get") is None:
        return "apt-get is not available (not Debian or Ubuntu): install HAProxy >= 2.2 yourself"
    if os.geteuid() != 0:
        return "installing Debian's haproxy needs root (apt-get)"
    return None


def provision() -> str | None:
    """Install Debian's ``haproxy`` unless it is already there.

    Returns its path, or None when it cannot be installed here; the reason is logged, and
    :func:`haproxy_path` gives it again to the tests, which are then skipped.  A failing
    ``apt-get`` is reported the same way rather than stopping the caller: the rest of the test
    command can still run.
    """
    executable = find()
    if executable is not None:
        return executable
    reason = cannot_install()
    if reason is not None:
        log(f"not installed: {reason}")
        return None
    log("installing Debian's haproxy (apt-get)")
    # Where an init system runs, the package also starts Debian's own haproxy service with its
    # default configuration (which opens no port the tests use); the tests start their own.
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "haproxy"],
    ):
        status = subprocess.run(command, env=env, stdin=subprocess.DEVNULL).returncode
        if status != 0:
            log(f"not installed: {' '.join(command)} exited {status}")
            return None
    return find()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--where",
        action="store_true",
        help="print the haproxy path, or why it cannot be used (exit status 1); install nothing",
    )
    options = parser.parse_args(argv)
    if not options.where:
        provision()
    try:
        print(haproxy_path())
    except HAProxyUnavailable as exc:
        print(f"haproxy unavailable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
