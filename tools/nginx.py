"""Provision Debian's nginx and its stream module for the tests that run iocp_echo behind it.

Usage::

    python3 tools/nginx.py            # install nginx + the stream module unless there (root)
    python3 tools/nginx.py --where    # print its path, or why it cannot be used (exit 1)

Why this exists: ``tests/test_nginx.py`` runs ``examples/nginx-stream.conf`` with a real nginx,
so the test command (``tools/check.py``) installs one the way it installs HAProxy
(``tools/haproxy.py``): Debian's ``nginx`` and ``libnginx-mod-stream`` packages through
``apt-get``, idempotently.  Nothing is done when nginx and its stream module are already
there.  (Debian 12's ``nginx-light`` is only a transitional package that pulls in ``nginx``
and an unrelated HTTP module, and later releases drop it: ``nginx`` is the name that works on
all of them.)  Installing needs root and ``apt-get``; where either is missing the tests are
skipped, and the reason they give is the one :func:`nginx_path` states.

Debian's package starts an nginx service of its own with the default site, on port 80, where
an init system lets it (a container's ``policy-rc.d`` usually does not).  The tests start
their own nginx and need no service, so one that the installation started is stopped and
disabled again: installing the test dependency leaves nothing listening.

``examples/nginx-stream.conf`` uses ``proxy_half_close`` (nginx 1.21.4 and later; Debian 12
ships 1.22.1) and loads the stream module from Debian's path.  Only the standard library is
used, so this runs on any Linux CPython >= 3.11.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

#: Where Debian installs it: /usr/sbin is not on an unprivileged user's PATH.
DEBIAN_PATH = "/usr/sbin/nginx"
#: The module examples/nginx-stream.conf loads (Debian builds the stream module separately).
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
#: ``proxy_half_close`` (an echo client's half-close, see the example) appeared in 1.21.4.
MINIMUM_VERSION = (1, 21, 4)
#: Debian's packages: the server, and the stream module it loads.
PACKAGES = ("nginx", "libnginx-mod-stream")
#: Where the service started by Debian's package (its /etc/nginx/nginx.conf) keeps its pid.
SERVICE_PID_FILE = Path("/run/nginx.pid")
#: How long a service that the installation started gets to exit once told to.
SERVICE_STOP_TIMEOUT = 10.0


class NginxUnavailable(RuntimeError):
    """nginx cannot be used here; the message says why (a test's skip reason)."""


def log(message: str) -> None:
    print(f"nginx: {message}", file=sys.stderr, flush=True)


def find() -> str | None:
    """The ``nginx`` executable on PATH, or Debian's, or None."""
    found = shutil.which("nginx")
    if found is None and os.access(DEBIAN_PATH, os.X_OK):
        found = DEBIAN_PATH
    return found


def describe(executable: str) -> str:
    """What ``nginx -V`` reports (on stderr): its version and configure arguments."""
    try:
        result = subprocess.run(
            [executable, "-V"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NginxUnavailable(f"{executable} -V failed: {exc}") from None
    return result.stdout + result.stderr


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The version in ``nginx -V``'s output ("nginx version: nginx/1.22.1"), if any."""
    match = re.search(r"nginx version: [^/\s]+/(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def stream_module(description: str) -> str | None:
    """How this nginx gets its stream module: the module file to load, or None when it is
    built in (``--with-stream``).  Raises NginxUnavailable when it has none.

    *description* is :func:`describe`'s output.  Debian's build says ``--with-stream=dynamic``
    and ships the module in ``libnginx-mod-stream``, at :data:`STREAM_MODULE`.
    """
    if re.search(r"--with-stream(?=\s|$)", description):
        return None
    if "--with-stream=dynamic" in description:
        if os.path.isfile(STREAM_MODULE):
            return STREAM_MODULE
        raise NginxUnavailable(
            f"nginx has no stream module: {STREAM_MODULE} is missing (Debian's "
            "libnginx-mod-stream): run 'python3 tools/nginx.py' as root"
        )
    raise NginxUnavailable("nginx is built without the stream module (no --with-stream)")


def check(executable: str) -> str | None:
    """Check that *executable* can run examples/nginx-stream.conf; return its stream module
    (None when built in).  Raises NginxUnavailable saying why it cannot."""
    description = describe(executable)
    found = parse_version(description)
    if found is None:
        raise NginxUnavailable(
            f"{executable} -V did not report a version: {description.strip()[:200]!r}"
        )
    if found < MINIMUM_VERSION:
        raise NginxUnavailable(
            f"{executable} is nginx {'.'.join(map(str, found))}; examples/nginx-stream.conf "
            f"needs {'.'.join(map(str, MINIMUM_VERSION))} or later (proxy_half_close)"
        )
    return stream_module(description)


def nginx_path() -> str:
    """The path of a usable ``nginx`` with the stream module; raises NginxUnavailable saying
    why there is none."""
    executable = find()
    if executable is None:
        raise NginxUnavailable(
            "nginx is not installed (not on PATH, no /usr/sbin/nginx): run "
            "'python3 tools/nginx.py' as root on Debian, or install nginx >= 1.21.4 with "
            "the stream module"
        )
    check(executable)
    return executable


def cannot_install() -> str | None:
    """Why this machine cannot install the packages, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"nginx is installed on Linux only (this is {sys.platform})"
    if shutil.which("apt-get") is None:
        return (
            "apt-get is not available (not Debian or Ubuntu): install nginx >= 1.21.4 with "
            "the stream module yourself"
        )
    if os.geteuid() != 0:
        return "installing Debian's nginx needs root (apt-get)"
    return None


def usable() -> str | None:
    """The nginx path when nginx and its stream module are both there, else None."""
    try:
        return nginx_path()
    except NginxUnavailable:
        return None


def run(command: list[str]) -> int:
    """Run *command* with apt-get's non-interactive settings; its exit status."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(command, env=env, stdin=subprocess.DEVNULL).returncode


def service_pid() -> int | None:
    """The pid of a running nginx service (the master process Debian's configuration starts,
    which writes :data:`SERVICE_PID_FILE`), or None.  The tests' own nginx processes write
    their pid elsewhere."""
    try:
        pid = int(SERVICE_PID_FILE.read_text().split()[0])
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if name == "nginx" else None


def stop_service(pid: int) -> bool:
    """Stop and disable the nginx service that the installation started (master *pid*).

    Under systemd, ``systemctl disable --now``; elsewhere the master gets SIGQUIT (nginx's
    graceful stop) and ``update-rc.d`` disables the init script, so that neither now nor at
    the next boot does the package's default site listen on port 80.  Returns whether the
    master is gone within :data:`SERVICE_STOP_TIMEOUT`.
    """
    log(f"the installation started Debian's nginx service (pid {pid}); stopping and disabling it")
    if os.path.isdir("/run/systemd/system"):
        run(["systemctl", "disable", "--now", "nginx"])
    else:
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            pass
        if shutil.which("update-rc.d") is not None:
            run(["update-rc.d", "nginx", "disable"])
    deadline = time.monotonic() + SERVICE_STOP_TIMEOUT
    while service_pid() == pid:
        if time.monotonic() > deadline:
            log(f"the nginx service (pid {pid}) is still running: stop it by hand")
            return False
        time.sleep(0.05)
    return True


def provision() -> str | None:
    """Install Debian's nginx and its stream module unless both are already there.

    Returns the nginx path, or None when it cannot be installed here; the reason is logged,
    and :func:`nginx_path` gives it again to the tests, which are then skipped.  A failing
    ``apt-get`` is reported the same way rather than stopping the caller: the rest of the test
    command can still run.  A service that the installation started is stopped again
    (:func:`stop_service`); one that was running before is left alone.
    """
    executable = usable()
    if executable is not None:
        return executable
    reason = cannot_install()
    if reason is not None:
        log(f"not installed: {reason}")
        return None
    running_before = service_pid()
    log(f"installing Debian's {' and '.join(PACKAGES)} (apt-get)")
    try:
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        ):
            status = run(command)
            if status != 0:
                log(f"not installed: {' '.join(command)} exited {status}")
                return None
    finally:
        started = service_pid()
        if started is not None and running_before is None:
            stop_service(started)
    executable = usable()
    if executable is None:
        log(f"installed, but still unusable: {_reason()}")
    return executable


def _reason() -> str:
    try:
        nginx_path()
    except NginxUnavailable as exc:
        return str(exc)
    return "usable"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--where",
        action="store_true",
        help="print the nginx path, or why it cannot be used (exit status 1); install nothing",
    )
    options = parser.parse_args(argv)
    if not options.where:
        provision()
    try:
        print(nginx_path())
    except NginxUnavailable as exc:
        print(f"nginx unavailable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
