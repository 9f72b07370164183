"""iocp_echo behind a real nginx (the ``stream`` module), running ``examples/nginx-stream.conf``.

Three instances of the command line (``--proxy-protocol --drain-seconds S``) sit behind
Debian's nginx, which opens each connection to an instance with a PROXY v1 header.  The
file is the example itself, with only the substitutions it documents at its top (the listen
port, the three instance addresses, the pid path), each checked to match exactly once.
nginx runs in the foreground (``daemon off``) as the test's child, with a temporary prefix;
its access log (the example's ``/dev/stdout``) and error log (``stderr``) go to files there.

What the tests show:

* exact echoes through nginx for many concurrent clients, past one read (65,535 bytes),
  including clients that send everything and half-close before reading a byte: the echo
  still comes back whole (``proxy_half_close``);
* the real client (its own ephemeral port) in each instance's admin snapshot, each instance
  naming exactly the clients nginx's access log says it sent there, PROXY v1 headers counted;
* what open-source nginx does with a draining instance, since it does not read ``/readyz``:
  it keeps sending it connections, and the instance serves them for ``--drain-seconds``; once
  the instance stops accepting, a refused connection is tried on the next instance
  (``proxy_next_upstream``).  No connection that ended before the instance could stop
  accepting fails, nor any that started after its port refuses; those in flight at the
  moment it stops may, and are counted (the example's comment says why; a balancer that
  reads ``/readyz``, as in ``test_haproxy.py``, loses none).

The ``wine_cli`` test runs the instances on Windows CPython under Wine behind the same native
nginx.  Instances, clients and bounded waits are those of ``tests/haproxy_support.py``.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.haproxy_support import (
    ROOT,
    EchoLoad,
    Instance,
    echo_once,
    failures,
    hold_connection,
    wait_for,
    wait_refused,
)

# tools/ is a folder of scripts, not a package (tests/haproxy_support.py puts it on sys.path
# for tools/haproxy.py; said again here, since this module depends on it too).
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
import nginx as nginx_tool

CONFIG = ROOT / "examples" / "nginx-stream.conf"


def _find_nginx() -> tuple[str | None, str | None, str]:
    """(nginx, its stream module or None when built in, "") when nginx can run the example,
    else (None, None, why not): the tests' skip reason."""
    if sys.platform == "win32":
        return (
            None,
            None,
            "nginx runs natively on Linux: the native run drives Windows instances under Wine "
            "behind it (the wine_cli test of this file)",
        )
    try:
        executable = nginx_tool.nginx_path()
        return executable, nginx_tool.check(executable), ""
    except nginx_tool.NginxUnavailable as exc:
        return None, None, str(exc)


NGINX, STREAM_MODULE, UNAVAILABLE = _find_nginx()

#: On every test that starts nginx (not on those of tools/nginx.py's own logic, at the end).
needs_nginx = pytest.mark.skipif(NGINX is None, reason=UNAVAILABLE)

#: Generous deadlines: a 2-core machine also runs nginx, the instances and the clients.
STATE_TIMEOUT = 30.0
WINE_STATE_TIMEOUT = 60.0
#: How many times nginx is started on a fresh port when another process took the one picked.
PORT_ATTEMPTS = 5

#: The values of examples/nginx-stream.conf that the tests replace (see its header).
LISTEN = "listen 9000;"
SERVERS = ("server 127.0.0.1:9001 ", "server 127.0.0.1:9002 ", "server 127.0.0.1:9003 ")
PID = "pid /run/nginx-iocp-echo.pid;"
LOAD_MODULE = f"load_module {nginx_tool.STREAM_MODULE};\n"

#: One line of the example's access log (log_format echo), written when a session ends.
ACCESS = re.compile(
    r"^(?P<client>\S+):(?P<port>\d+) -> (?P<upstream>.+) (?P<status>\d{3}) "
    r"in=(?P<bytes_in>\d+) out=(?P<bytes_out>\d+) (?P<seconds>[\d.]+)s$"
)


def _replace_once(text: str, old: str, new: str) -> str:
    """*text* with *old* replaced by *new* in the one directive line (not a comment) that
    holds it; fails unless exactly one does."""
    lines = text.splitlines(keepends=True)
    found = [n for n, line in enumerate(lines) if old in line and not _comment(line)]
    assert len(found) == 1, f"{CONFIG.name}: {old!r} found {len(found)} times, not once"
    lines[found[0]] = lines[found[0]].replace(old, new)
    return "".join(lines)


def _comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def render_config(
    text: str,
    *,
    listen: tuple[str, int],
    servers: Sequence[str],
    pid_path: Path,
    stream_module: str | None,
) -> str:
    """examples/nginx-stream.conf with the substitutions its header documents, and no other.

    *servers* are the three instances' ``host:port``; *stream_module* is None where nginx has
    the stream module built in (the load_module line goes, as the example's comment says).
    """
    assert len(servers) == len(SERVERS)
    text = _replace_once(text, LISTEN, f"listen {listen[0]}:{listen[1]};")
    for old, address in zip(SERVERS, servers, strict=True):
        text = _replace_once(text, old, f"server {address} ")
    text = _replace_once(text, PID, f"pid {pid_path};")
    if stream_module is None:
        text = _replace_once(text, LOAD_MODULE, "")
    else:
        assert stream_module == nginx_tool.STREAM_MODULE
        loads = [line for line in text.splitlines(keepends=True) if line == LOAD_MODULE]
        assert len(loads) == 1, "the example loads another stream module"
    return text


@dataclass(frozen=True)
class Session:
    """One line of nginx's access log: a client connection and where nginx sent it."""

    client: tuple[str, int]
    upstreams: tuple[str, ...]  # every instance tried, in order ("a, b": a refused)
    status: int


class Nginx:
    """``nginx -p TMP -c TMP/nginx.conf -g 'daemon off;'``: the example, in the foreground.

    nginx takes listening sockets over only from an older nginx (a binary upgrade, through an
    environment variable its documentation calls internal), not from its parent as HAProxy's
    ``fd@`` does.  So the port is picked by binding port 0 and closing it, and nginx binds it
    again.  Another process may take it in between: nginx then exits saying "Address already
    in use", and is started again on a fresh port (at most PORT_ATTEMPTS times).
    """

    def __init__(self, executable: str, instances: Sequence[Instance], folder: Path) -> None:
        self.executable = executable
        self.instances = list(instances)
        self.folder = folder
        self.config_path = folder / "nginx.conf"
        self.access_path = folder / "access.log"
        self.log_path = folder / "nginx.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        for _ in range(PORT_ATTEMPTS):
            if self._start_once():
                return self
        raise AssertionError(f"nginx found no free port in {PORT_ATTEMPTS} tries")

    def _start_once(self) -> bool:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.config_path.write_text(
            render_config(
                CONFIG.read_text(),
                listen=("127.0.0.1", self.port),
                servers=[i.address for i in self.instances],
                pid_path=self.folder / "nginx.pid",
                stream_module=STREAM_MODULE,
            )
        )
        started_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.access_path, "ab") as access, open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.executable,
                    "-p",
                    f"{self.folder}/",
                    "-c",
                    str(self.config_path),
                    "-g",
                    "daemon off;",
                ],
                stdout=access,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        process = self.process

        def started_or_exited() -> bool:
            # The master binds its listening sockets before it starts the workers, and says so.
            return process.poll() is not None or "start worker processes" in self._log_since(
                started_at
            )

        wait_for(started_or_exited, STATE_TIMEOUT, f"nginx to start; log:\n{self.log_tail()}")
        if process.poll() is None:
            return True
        if "Address already in use" in self._log_since(started_at):
            return False
        raise AssertionError(f"nginx exited with {process.returncode}; log:\n{self.log_tail()}")

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def sessions(self) -> list[Session]:
        """Every session nginx has logged so far (a session is logged when it ends)."""
        found = []
        text = self.access_path.read_text(errors="replace")
        # Complete lines only: one nginx is writing now may not have landed whole yet.
        for line in text[: text.rfind("\n") + 1].splitlines():
            match = ACCESS.match(line)
            assert match is not None, f"not a line of log_format echo: {line!r}"
            found.append(
                Session(
                    (match["client"], int(match["port"])),
                    tuple(match["upstream"].split(", ")),
                    int(match["status"]),
                )
            )
        return found

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown); SIGKILL if it is still there 30 s later."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


@dataclass
class Fleet:
    instances: list[Instance]
    nginx: Nginx
    state_timeout: float


@contextmanager
def start_fleet(
    folder: Path, *, drain_seconds: float, wine_python: str | None = None
) -> Iterator[Fleet]:
    """Three instances started together (the example's three servers), nginx in front."""
    assert NGINX is not None
    state_timeout = WINE_STATE_TIMEOUT if wine_python else STATE_TIMEOUT
    with ExitStack() as stack:
        instances = []
        for number in range(1, len(SERVERS) + 1):
            instance = Instance(
                f"echo{number}",
                folder,
                drain_seconds=drain_seconds,
                wine_python=wine_python,
                startup_timeout=state_timeout,
            )
            stack.callback(instance.close)
            instance.launch()
            instances.append(instance)
        for instance in instances:
            instance.wait_started()
        balancer = Nginx(NGINX, instances, folder)
        stack.callback(balancer.stop)
        balancer.start()
        yield Fleet(instances, balancer, state_timeout)


def proxy_counts(fleet: Fleet) -> dict[str, dict[str, int]]:
    """Each instance's PROXY header outcomes (stats.proxy_headers of its admin snapshot)."""
    return {i.name: dict(i.snapshot()["stats"]["proxy_headers"]) for i in fleet.instances}


def echo_after_half_close(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    """Send all of *payload*, half-close, and only then read: everything that comes back.

    The whole echo is still in flight when the client's FIN reaches nginx; without
    ``proxy_half_close`` nginx would end the session there and the echo would be cut (tried
    by hand with the example's line turned off: all of HALF_CLOSE_SIZES came back empty).  The
    payload (up to a few hundred KB) fits in loopback's socket buffers on the way, so sending
    it all before reading cannot deadlock; the timeout bounds the wait if it did.
    """
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- what each test shows, natively and under Wine --------------------------------------------

#: Payload sizes for the exact-echo check: tiny, around one read (65,535), and far past it.
ECHO_SIZES = (1, 2, 100, 1_000, 4_096, 65_535, 65_536, 65_537, 100_000, 300_000)
#: Sizes sent whole, then half-closed, before the client reads.
HALF_CLOSE_SIZES = (1, 65_536, 100_000)


def check_exact_echoes(fleet: Fleet, clients: int = 16, echoes: int = 60) -> None:
    """Many clients at once, every payload echoed exactly, every instance served some, and
    every connection arrived with one PROXY v1 header (nothing else)."""
    before = proxy_counts(fleet)
    rng = random.Random(15)
    sizes = [ECHO_SIZES[i % len(ECHO_SIZES)] for i in range(echoes - 20)]
    sizes += [rng.randrange(1, 200_000) for _ in range(20)]
    payloads = [rng.randbytes(size) for size in sizes]
    half_closed = [rng.randbytes(size) for size in HALF_CLOSE_SIZES]
    port = fleet.nginx.port
    timeout = 2 * fleet.state_timeout
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        echoed = pool.map(lambda p: echo_once(port, p, timeout=timeout), payloads)
        late = pool.map(lambda p: echo_after_half_close(port, p, timeout), half_closed)
        results = [*zip(payloads, echoed, strict=True), *zip(half_closed, late, strict=True)]
    wrong = [(len(p), len(e)) for p, e in results if p != e]
    assert wrong == [], f"(sent, received) for wrong echoes: {wrong}"
    after = proxy_counts(fleet)
    v1 = {name: after[name]["v1"] - before[name]["v1"] for name in after}
    assert sum(v1.values()) == len(results), v1  # one header per connection, none retried
    assert all(v1.values()), v1  # round robin: every instance got some
    for name, counts in after.items():
        assert all(n == 0 for outcome, n in counts.items() if outcome != "v1"), (name, counts)


def check_real_client_address(fleet: Fleet, per_instance: int = 2) -> None:
    """Clients hold connections open through nginx; the instances name exactly them.

    nginx's own connections to the instances come from other ports; with the PROXY header
    each instance's pending receive names the client's own ephemeral port.  Once the clients
    close, nginx's access log says which instance it sent each client to: the same one.
    """
    before = proxy_counts(fleet)
    with ExitStack() as stack:
        clients = []
        for _ in range(per_instance * len(fleet.instances)):
            sock = hold_connection(fleet.nginx.port)
            stack.callback(sock.close)
            clients.append(sock)
        expected = {("127.0.0.1", int(sock.getsockname()[1])) for sock in clients}
        seen: dict[str, set[tuple[str, int]]] = {}

        def every_client_seen() -> bool:
            seen.update({i.name: i.peers() for i in fleet.instances})
            return set().union(*seen.values()) >= expected

        wait_for(every_client_seen, fleet.state_timeout, f"clients {expected} (saw {seen})")
        assert set().union(*seen.values()) == expected, (expected, seen)
        assert sum(len(peers) for peers in seen.values()) == len(expected), seen  # one each
        assert all(seen.values()), seen
        after = proxy_counts(fleet)
        for name in after:
            assert after[name]["v1"] - before[name]["v1"] == len(seen[name]), (before, after)
            assert after[name]["malformed"] == before[name]["malformed"], after
    # The clients closed: nginx logs each session as it ends.
    sent_to: dict[tuple[str, int], tuple[str, ...]] = {}

    def all_logged() -> bool:
        sent_to.update({s.client: s.upstreams for s in fleet.nginx.sessions()})
        return expected <= sent_to.keys()

    wait_for(all_logged, fleet.state_timeout, f"nginx to log {expected} (logged {sent_to})")
    for instance in fleet.instances:
        for client in seen[instance.name]:
            assert sent_to[client] == (instance.address,), (client, instance.address, sent_to)


# -- natively ---------------------------------------------------------------------------------


@needs_nginx
def test_exact_echoes_through_nginx(tmp_path: Path) -> None:
    with start_fleet(tmp_path, drain_seconds=3) as fleet:
        check_exact_echoes(fleet)


@needs_nginx
def test_instances_see_the_real_client(tmp_path: Path) -> None:
    with start_fleet(tmp_path, drain_seconds=3) as fleet:
        check_real_client_address(fleet)


@needs_nginx
def test_draining_instance_keeps_serving_then_nginx_tries_the_next(tmp_path: Path) -> None:
    """SIGTERM one instance under load; nginx, which does not read /readyz, keeps sending it
    connections while it drains; once it stops, nginx retries refusals on the others.

    Guaranteed, and asserted: the draining instance serves new connections (its count grows
    while its /readyz says 503); no client connection that ended before the instance could
    stop accepting (the signal + --drain-seconds) fails; none that started after its port
    refuses fails, and nginx's log shows connections tried on it, refused, and served by
    another.  Not guaranteed: a connection in flight on the instance, or queued in its
    listener's backlog, when it stops accepting is cut or reset, and nginx cannot retry it
    (the example's comment).  Those are counted and shown; they must lie in that window.
    """
    with start_fleet(tmp_path, drain_seconds=3) as fleet:
        victim, others = fleet.instances[0], fleet.instances[1:]
        timeout = fleet.state_timeout
        with EchoLoad(fleet.nginx.port, clients=4) as load:
            load.wait_successes(20, time.monotonic(), timeout)
            signalled = time.monotonic()
            victim.send_stop_signal()
            wait_for(lambda: victim.readyz()[0] == 503, timeout, "/readyz to turn 503")
            assert victim.readyz() == (503, "draining\n")
            at_503 = victim.snapshot()["stats"]["total_connections"]
            served = [0]

            def draining() -> bool:
                """Still draining (then note how many it has taken since), or stopping?"""
                try:
                    document = victim.snapshot()
                except OSError:  # its admin endpoint has closed: it has stopped
                    return False
                if document["server"]["readiness"] != "draining":
                    return False
                served.append(document["stats"]["total_connections"] - at_503)
                return True

            # Watched until the drain ends: the count only ever grows while it is draining.
            wait_for(lambda: not draining(), victim.drain_seconds + timeout, "the drain's end")
            assert served[-1] >= 10, f"only {served[-1]} new connections while draining"
            status = victim.wait(victim.drain_seconds + timeout)
            exited = time.monotonic()
            gone = wait_refused(victim.port, timeout)
            load.wait_successes(20, gone, timeout)  # the others carry on alone
            at_gone = {i.name: i.snapshot()["stats"]["total_connections"] for i in others}

            def retried_elsewhere() -> bool:
                return any(
                    len(s.upstreams) > 1 and s.upstreams[0] == victim.address and s.status == 200
                    for s in fleet.nginx.sessions()
                )

            wait_for(retried_elsewhere, timeout, "a session refused by it, served by another")
            load.wait_successes(20, time.monotonic(), timeout)
        attempts = load.attempts()
        after = {i.name: i.snapshot()["stats"]["total_connections"] for i in others}
    failed = failures(attempts)
    stop_from = signalled + victim.drain_seconds  # the instance cannot stop accepting earlier
    during = [a for a in attempts if a.started >= signalled and a.ended < stop_from]
    later = [a for a in attempts if a.started >= gone]
    print(  # shown with -s (or -rP)
        f"drain: {served[-1]} or more new connections while draining; exited "
        f"{exited - signalled:.2f} s after the signal, port refused {gone - exited:.3f} s "
        f"later; {len(failed)} of {len(attempts)} client connections failed "
        f"({[a.error for a in failed]})"
    )
    assert status == 0, victim.log_tail()
    assert exited - signalled >= victim.drain_seconds
    assert during and failures(during) == [], failures(during)
    assert [a for a in attempts if a.ended < stop_from and a.error] == []
    assert later and failures(later) == [], failures(later)
    assert [a for a in failed if not (a.started < gone and a.ended >= stop_from)] == [], failed
    assert all(after[name] > at_gone[name] for name in after), (at_gone, after)
    log = victim.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "iocp-echo: stopped" in log


@needs_nginx
def test_the_config_is_valid_as_shipped_and_as_the_tests_run_it(tmp_path: Path) -> None:
    """``nginx -t`` accepts examples/nginx-stream.conf as it is, and the tests' version."""
    assert NGINX is not None
    rendered = tmp_path / "nginx.conf"
    rendered.write_text(
        render_config(
            CONFIG.read_text(),
            listen=("127.0.0.1", 9000),
            servers=["127.0.0.1:9011", "127.0.0.1:9012", "127.0.0.1:9013"],
            pid_path=tmp_path / "nginx.pid",
            stream_module=STREAM_MODULE,
        )
    )
    for path in (CONFIG, rendered):
        result = subprocess.run(
            [NGINX, "-t", "-p", f"{tmp_path}/", "-c", str(path)],
            capture_output=True,
            text=True,
            env={"PATH": os.defpath},
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "test is successful" in result.stderr


def test_the_substitutions_are_exact() -> None:
    """Each value replaced is found exactly once, and nothing else changes."""
    text = CONFIG.read_text()
    pid_path = Path("/tmp/x/nginx.pid")  # written with this platform's separators
    rendered = render_config(
        text,
        listen=("127.0.0.1", 4321),
        servers=["127.0.0.1:1111", "127.0.0.1:2222", "127.0.0.1:3333"],
        pid_path=pid_path,
        stream_module=nginx_tool.STREAM_MODULE,
    )
    changed = [
        (old, new)
        for old, new in zip(text.splitlines(), rendered.splitlines(), strict=True)
        if old != new
    ]
    assert [new.strip() for _, new in changed] == [
        f"pid {pid_path};",
        "server 127.0.0.1:1111 max_fails=0;",
        "server 127.0.0.1:2222 max_fails=0;",
        "server 127.0.0.1:3333 max_fails=0;",
        "listen 127.0.0.1:4321;",
    ]
    built_in = render_config(
        text,
        listen=("127.0.0.1", 4321),
        servers=["127.0.0.1:1111", "127.0.0.1:2222", "127.0.0.1:3333"],
        pid_path=pid_path,
        stream_module=None,
    )
    assert not [line for line in built_in.splitlines() if line.startswith("load_module")]
    assert len(built_in.splitlines()) == len(rendered.splitlines()) - 1
    with pytest.raises(AssertionError, match="found 0 times"):
        render_config(
            text.replace("listen 9000;", "listen 9999;"),
            listen=("127.0.0.1", 4321),
            servers=["a:1", "b:2", "c:3"],
            pid_path=pid_path,
            stream_module=nginx_tool.STREAM_MODULE,
        )


# -- Windows CPython under Wine, behind the same nginx ----------------------------------------


@needs_nginx
@pytest.mark.wine_cli
def test_wine_instances_echo_exactly_and_see_the_real_client(
    tmp_path: Path, wine_python: str
) -> None:
    with start_fleet(tmp_path, drain_seconds=4, wine_python=wine_python) as fleet:
        assert all(i.backend.startswith("IOCP") for i in fleet.instances)
        check_exact_echoes(fleet)
        check_real_client_address(fleet)


# -- tools/nginx.py: what the test command does where nginx is missing -------------------------

DEBIAN_V = (
    "nginx version: nginx/1.22.1\nbuilt with OpenSSL 3.0.11\nTLS SNI support enabled\n"
    "configure arguments: --with-cc-opt='-g -O2' --prefix=/usr/share/nginx "
    "--with-stream=dynamic --with-stream_ssl_module --with-stream_realip_module "
    "--with-stream_geoip_module=dynamic\n"
)


def test_provisioning_skips_an_installed_nginx(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_apt(command: list[str]) -> int:
        raise AssertionError(f"apt-get run although nginx is installed: {command}")

    monkeypatch.setattr(nginx_tool, "usable", lambda: "/usr/sbin/nginx")
    monkeypatch.setattr(nginx_tool, "run", no_apt)
    assert nginx_tool.provision() == "/usr/sbin/nginx"


def test_provisioning_where_it_cannot_install_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(nginx_tool, "find", lambda: None)
    monkeypatch.setattr(nginx_tool, "cannot_install", lambda: "installing needs root")
    assert nginx_tool.provision() is None
    assert "nginx: not installed: installing needs root" in capsys.readouterr().err
    with pytest.raises(nginx_tool.NginxUnavailable, match="nginx is not installed"):
        nginx_tool.nginx_path()


def test_a_service_the_installation_started_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's package starts its service (port 80) where the init system lets it: the
    provisioning stops it again.  One that ran before is left alone."""

    class Machine:
        service: int | None = None  # the service's master pid, when it runs
        installed = False

    commands: list[list[str]] = []
    stopped: list[int] = []

    def apt(command: list[str]) -> int:
        commands.append(command)
        if command[:2] == ["apt-get", "install"]:
            Machine.installed = True
            if Machine.service is None:
                Machine.service = 4242  # the postinst's "invoke-rc.d nginx start"
        return 0

    def stop_service(pid: int) -> bool:
        stopped.append(pid)
        return True

    monkeypatch.setattr(nginx_tool, "cannot_install", lambda: None)
    monkeypatch.setattr(
        nginx_tool, "usable", lambda: "/usr/sbin/nginx" if Machine.installed else None
    )
    monkeypatch.setattr(nginx_tool, "run", apt)
    monkeypatch.setattr(nginx_tool, "service_pid", lambda: Machine.service)
    monkeypatch.setattr(nginx_tool, "stop_service", stop_service)
    assert nginx_tool.provision() == "/usr/sbin/nginx"
    assert commands == [
        ["apt-get", "update", "-qq"],
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "nginx",
            "libnginx-mod-stream",
        ],
    ]
    assert stopped == [4242]

    Machine.service, Machine.installed = 1111, False
    stopped.clear()
    assert nginx_tool.provision() == "/usr/sbin/nginx"
    assert stopped == []  # running before the installation: not ours to stop


def test_an_nginx_without_the_stream_module_or_too_old_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert nginx_tool.parse_version(DEBIAN_V) == (1, 22, 1)
    assert nginx_tool.parse_version("nginx version: openresty/1.21.4.3") == (1, 21, 4)
    assert nginx_tool.parse_version("command not found") is None
    assert nginx_tool.stream_module("configure arguments: --with-stream --with-http_ssl") is None
    module = tmp_path / "ngx_stream_module.so"
    monkeypatch.setattr(nginx_tool, "STREAM_MODULE", str(module))
    with pytest.raises(nginx_tool.NginxUnavailable, match="libnginx-mod-stream"):
        nginx_tool.stream_module(DEBIAN_V)
    module.touch()
    assert nginx_tool.stream_module(DEBIAN_V) == str(module)
    with pytest.raises(nginx_tool.NginxUnavailable, match="without the stream module"):
        nginx_tool.stream_module("configure arguments: --with-stream_ssl_module")
    monkeypatch.setattr(nginx_tool, "find", lambda: "/opt/nginx")
    monkeypatch.setattr(nginx_tool, "describe", lambda executable: DEBIAN_V.replace("22.1", "20.2"))
    with pytest.raises(nginx_tool.NginxUnavailable, match=r"nginx 1\.20\.2; .* needs 1\.21\.4"):
        nginx_tool.nginx_path()
