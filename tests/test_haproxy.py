"""iocp_echo behind a real HAProxy, configured by ``examples/haproxy.cfg`` itself.

Two or three instances of the command line (``--proxy-protocol --drain-seconds S``) sit behind
Debian's HAProxy, which sends each connection a PROXY v2 header and checks each instance's
``/readyz``.  The tests show what the load balancer world needs from an instance:

* exact echoes through the balancer, for many clients and payloads past one read (65,535);
* the real client (its own ephemeral port) in each instance's admin snapshot, not HAProxy's;
* a stopped instance (SIGTERM; Ctrl-C under Wine) drained with zero failed client connections:
  ``/readyz`` turns 503, HAProxy marks it DOWN while it still accepts, the others serve;
* a killed instance (SIGKILL) taken out by the health check and a restarted one taken back;
  only the connections it held when it died may fail (HAProxy retries a refused connection on
  another instance, ``option redispatch``; it cannot replay one that was cut);
* a rolling restart of every instance under steady load with zero failed connections.

The ``wine_cli`` tests run the instances on Windows CPython under Wine (IOCP) behind the same
native HAProxy.  Every wait is on an observed state (HAProxy's stats socket, ``/readyz``, a
process exit) with a deadline; HAProxy checks every 200 ms here (``IOCP_ECHO_CHECK_INTER``)
and needs two failures for DOWN, two successes for UP.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import haproxy_support
from tests.haproxy_support import (
    CONFIG,
    SERVERS,
    EchoLoad,
    HAProxy,
    Instance,
    echo_once,
    failures,
    haproxy_or_skip_reason,
    hold_connection,
    proxy_v1_header,
    wait_refused,
)

if sys.platform == "win32":
    HAPROXY: str | None = None
    UNAVAILABLE = (
        "HAProxy runs natively on Linux: the native run drives Windows instances under Wine "
        "behind it (the wine_cli tests of this file)"
    )
else:
    HAPROXY, UNAVAILABLE = haproxy_or_skip_reason()

haproxy_tool = haproxy_support.haproxy  # tools/haproxy.py, which provisions HAProxy

pytestmark = pytest.mark.haproxy
#: On every test that starts HAProxy (not on those of tools/haproxy.py's own logic, at the end).
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason=UNAVAILABLE)

#: Generous deadlines: a 2-core machine also runs HAProxy, the instances and the clients.
STATE_TIMEOUT = 30.0
WINE_STATE_TIMEOUT = 60.0


@dataclass
class Fleet:
    instances: list[Instance]
    haproxy: HAProxy
    state_timeout: float

    def name(self, instance: Instance) -> str:
        """The instance's server name in examples/haproxy.cfg (echo1, echo2, echo3)."""
        return SERVERS[self.instances.index(instance)]


@contextmanager
def start_fleet(
    folder: Path, count: int, *, drain_seconds: float, wine_python: str | None = None
) -> Iterator[Fleet]:
    """*count* instances started together, HAProxy in front, every server UP (a check passed)."""
    assert HAPROXY is not None
    state_timeout = WINE_STATE_TIMEOUT if wine_python else STATE_TIMEOUT
    with ExitStack() as stack:
        instances = []
        for number in range(1, count + 1):
            instance = Instance(
                f"echo{number}", folder, drain_seconds=drain_seconds, wine_python=wine_python
            )
            stack.callback(instance.close)
            instance.launch()
            instances.append(instance)
        for instance in instances:
            instance.wait_started()
        balancer = HAProxy(HAPROXY, instances, folder)
        stack.callback(balancer.stop)
        balancer.start()
        balancer.wait_all_up(state_timeout)
        yield Fleet(instances, balancer, state_timeout)


# -- what each test shows, natively and under Wine --------------------------------------------

#: Payload sizes for the exact-echo check: tiny, around one read (65,535), and far past it.
ECHO_SIZES = (1, 2, 100, 1_000, 4_096, 65_535, 65_536, 65_537, 100_000, 300_000)


def check_exact_echoes(fleet: Fleet, clients: int = 16, echoes: int = 60) -> None:
    """Many clients at once, every payload echoed exactly, and every instance served some."""
    before = {name: fleet.haproxy.sessions(name) for name in map(fleet.name, fleet.instances)}
    rng = random.Random(15)
    sizes = [ECHO_SIZES[i % len(ECHO_SIZES)] for i in range(echoes - 20)]
    sizes += [rng.randrange(1, 200_000) for _ in range(20)]
    payloads = [rng.randbytes(size) for size in sizes]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        echoed = list(pool.map(lambda p: echo_once(fleet.haproxy.port, p, timeout=60), payloads))
    wrong = [(len(p), len(e)) for p, e in zip(payloads, echoed, strict=True) if p != e]
    assert wrong == [], f"(sent, received) for wrong echoes: {wrong}"
    after = {name: fleet.haproxy.sessions(name) for name in before}
    assert sum(after.values()) - sum(before.values()) == echoes
    assert all(after[name] > before[name] for name in before), (before, after)


def check_real_client_address(fleet: Fleet, per_instance: int = 2) -> None:
    """Clients hold connections open through HAProxy; the instances name exactly them.

    HAProxy's own connections to the instances come from other ports, so without the PROXY
    header the instances would show those; with it, each instance's pending receive names the
    client's own ephemeral port, and every instance has some (round robin).
    """
    with ExitStack() as stack:
        clients = []
        for _ in range(per_instance * len(fleet.instances)):
            sock = hold_connection(fleet.haproxy.port)
            stack.callback(sock.close)
            clients.append(sock)
        expected = {("127.0.0.1", int(sock.getsockname()[1])) for sock in clients}
        seen: dict[str, set[tuple[str, int]]] = {}

        def every_client_seen() -> bool:
            seen.update({i.name: i.peers() for i in fleet.instances})
            return set().union(*seen.values()) >= expected

        deadline = time.monotonic() + fleet.state_timeout
        while not every_client_seen():
            assert time.monotonic() < deadline, f"clients {expected}, instances saw {seen}"
            time.sleep(0.05)
        assert set().union(*seen.values()) == expected, (expected, seen)
        assert sum(len(peers) for peers in seen.values()) == len(expected), seen  # one each
        assert all(seen[i.name] for i in fleet.instances), seen
        for instance in fleet.instances:
            stats = instance.snapshot()["stats"]
            assert stats["proxy_headers"]["v2"] >= len(seen[instance.name]), stats
            assert stats["proxy_headers"]["malformed"] == 0, stats


def check_drain(fleet: Fleet, victim: Instance) -> None:
    """Stop *victim* (SIGTERM; Ctrl-C under Wine) under load: no client connection fails.

    The order that makes it so, each step observed: /readyz turns 503; HAProxy marks the
    instance DOWN (check status L7STS) while it still accepts, and sends it nothing more; it
    exits 0 no sooner than --drain-seconds after the signal; the others serve throughout.
    """
    name = fleet.name(victim)
    others = [fleet.name(i) for i in fleet.instances if i is not victim]
    with EchoLoad(fleet.haproxy.port, clients=4) as load:
        load.wait_successes(20, time.monotonic(), fleet.state_timeout)
        signalled = time.monotonic()
        victim.send_stop_signal()
        down = fleet.haproxy.wait_state(name, "DOWN", fleet.state_timeout, "L7STS")
        marked_down = time.monotonic()
        assert down["check_code"] == "503", down
        assert victim.running(), "the instance stopped before HAProxy marked it DOWN"
        assert victim.readyz() == (503, "draining\n")
        # Still accepting, as a balancer that has not yet noticed would need: a direct
        # connection (with the PROXY header HAProxy would have sent) is echoed.
        header = proxy_v1_header(("192.0.2.1", 40_000), ("127.0.0.1", victim.port))
        assert echo_once(victim.port, b"still here", prefix=header) == b"still here"
        sessions_at_down = int(down["stot"])
        others_at_down = {other: fleet.haproxy.sessions(other) for other in others}
        status = victim.wait(victim.drain_seconds + fleet.state_timeout)
        exited = time.monotonic()
        load.wait_successes(20, exited, fleet.state_timeout)  # the others carry on alone
    attempts = load.attempts()
    print(  # shown with -s (or -rP)
        f"drain: DOWN {marked_down - signalled:.2f} s after the signal, exited after "
        f"{exited - signalled:.2f} s; {len(failures(attempts))} of {len(attempts)} failed"
    )
    assert failures(attempts) == [], failures(attempts)[:10]
    assert status == 0, victim.log_tail()
    assert marked_down - signalled < victim.drain_seconds
    assert exited - signalled >= victim.drain_seconds
    assert fleet.haproxy.sessions(name) == sessions_at_down  # nothing new after DOWN
    assert all(fleet.haproxy.sessions(o) > n for o, n in others_at_down.items()), others_at_down
    log = victim.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "iocp-echo: stopped" in log


# -- natively ---------------------------------------------------------------------------------


@needs_haproxy
def test_exact_echoes_through_haproxy(tmp_path: Path) -> None:
    with start_fleet(tmp_path, 3, drain_seconds=3) as running:
        check_exact_echoes(running)


@needs_haproxy
def test_instances_see_the_real_client(tmp_path: Path) -> None:
    with start_fleet(tmp_path, 3, drain_seconds=3) as running:
        check_real_client_address(running)


@needs_haproxy
def test_sigterm_drains_an_instance_without_a_failed_connection(tmp_path: Path) -> None:
    with start_fleet(tmp_path, 3, drain_seconds=3) as running:
        check_drain(running, running.instances[0])


@needs_haproxy
def test_killed_instance_is_taken_out_and_a_restarted_one_taken_back(tmp_path: Path) -> None:
    """SIGKILL: no drain.  What may fail is only what the instance held when it died.

    The health check (a refused connection to /readyz: L4CON) takes it out; connections HAProxy
    sends it meanwhile are refused and retried on another instance, so no client connection
    that starts once its port refuses fails.  Until then (a few milliseconds after the process
    is reaped, natively: see wait_refused) the kernel may still complete a connection to it
    and then reset it, after HAProxy sent the client's first bytes: that one fails too.
    Restarted on the same ports, two passed checks take it back, and it serves again.
    """
    with start_fleet(tmp_path, 3, drain_seconds=3) as running:
        victim = running.instances[0]
        name = running.name(victim)
        with EchoLoad(running.haproxy.port, clients=4) as load:
            load.wait_successes(20, time.monotonic(), STATE_TIMEOUT)
            killed = time.monotonic()
            victim.kill()
            victim.wait(STATE_TIMEOUT)
            gone = wait_refused(victim.port, STATE_TIMEOUT)  # its listener, a little later
            running.haproxy.wait_state(name, "DOWN", STATE_TIMEOUT, "L4CON")
            load.wait_successes(20, gone, STATE_TIMEOUT)
            victim.start()  # the same ports, so the same server in HAProxy
            up = running.haproxy.wait_state(name, "UP", STATE_TIMEOUT, "L7OK")
            taken_back = int(up["stot"])
            restarted = time.monotonic()
            load.wait_successes(20, restarted, STATE_TIMEOUT)
            deadline = time.monotonic() + STATE_TIMEOUT
            while running.haproxy.sessions(name) <= taken_back:
                assert time.monotonic() < deadline, "the restarted instance got no connection"
                time.sleep(0.05)
        attempts = load.attempts()
        failed = failures(attempts)
        backend = running.haproxy.servers()
        retried = sum(int(row["wretr"] or 0) + int(row["wredis"] or 0) for row in backend.values())
        # Shown with -s (or -rP): how many connections the kill cost, how many HAProxy saved.
        print(
            f"kill window: {len(failed)} of {len(attempts)} client connections failed "
            f"({[a.error for a in failed]}); HAProxy retried {retried} elsewhere"
        )
        # Only connections in flight when it died: started before its port refused, ended
        # after the kill.  None that started later.
        assert [a for a in failed if not (a.started < gone and a.ended >= killed)] == [], failed
        assert victim.snapshot()["stats"]["total_connections"] > 0


@needs_haproxy
def test_rolling_restart_under_load_fails_no_connection(tmp_path: Path) -> None:
    """Every instance in turn: SIGTERM, DOWN, drained, exited 0, restarted on its ports, UP.
    Clients echo through HAProxy the whole time: not one connection fails."""
    with start_fleet(tmp_path, 3, drain_seconds=2) as running:
        with EchoLoad(running.haproxy.port, clients=4) as load:
            load.wait_successes(20, time.monotonic(), STATE_TIMEOUT)
            for instance in running.instances:
                name = running.name(instance)
                instance.send_stop_signal()
                running.haproxy.wait_state(name, "DOWN", STATE_TIMEOUT, "L7STS")
                assert instance.wait(instance.drain_seconds + STATE_TIMEOUT) == 0
                instance.start()
                up = running.haproxy.wait_state(name, "UP", STATE_TIMEOUT, "L7OK")
                deadline = time.monotonic() + STATE_TIMEOUT
                while running.haproxy.sessions(name) <= int(up["stot"]):
                    assert time.monotonic() < deadline, f"restarted {name} got no connection"
                    time.sleep(0.05)
            load.wait_successes(20, time.monotonic(), STATE_TIMEOUT)
        attempts = load.attempts()
        assert failures(attempts) == [], failures(attempts)[:10]
        assert len(attempts) >= 100
        for instance in running.instances:
            log = instance.log_path.read_text(errors="replace")
            assert log.count("iocp-echo: stopped") == 1 and "Traceback" not in log


# -- Windows CPython under Wine, behind the same HAProxy --------------------------------------


@pytest.fixture
def wine_python(request: pytest.FixtureRequest) -> str:
    version = request.config.getoption("--wine-python")
    assert isinstance(version, str)
    return version


@needs_haproxy
@pytest.mark.wine_cli
def test_wine_instances_echo_exactly_and_see_the_real_client(
    tmp_path: Path, wine_python: str
) -> None:
    with start_fleet(tmp_path, 2, drain_seconds=4, wine_python=wine_python) as running:
        assert all(i.backend.startswith("IOCP") for i in running.instances)
        check_exact_echoes(running)
        check_real_client_address(running)


@needs_haproxy
@pytest.mark.wine_cli
def test_wine_instance_drains_on_ctrl_c_without_a_failed_connection(
    tmp_path: Path, wine_python: str
) -> None:
    with start_fleet(tmp_path, 2, drain_seconds=4, wine_python=wine_python) as running:
        check_drain(running, running.instances[0])


@needs_haproxy
def test_the_config_is_valid_as_shipped() -> None:
    """``haproxy -c`` accepts examples/haproxy.cfg with its defaults (no variable set)."""
    assert HAPROXY is not None
    result = subprocess.run(
        [HAPROXY, "-c", "-f", str(CONFIG)],
        capture_output=True,
        text=True,
        env={"PATH": os.defpath},
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- tools/haproxy.py: what the test command does where HAProxy is missing ----------------------


def test_provisioning_skips_an_installed_haproxy(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_apt(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"apt-get run although haproxy is installed: {args}")

    monkeypatch.setattr(haproxy_tool, "find", lambda: "/usr/sbin/haproxy")
    monkeypatch.setattr(subprocess, "run", no_apt)
    assert haproxy_tool.provision() == "/usr/sbin/haproxy"


def test_provisioning_where_it_cannot_install_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(haproxy_tool, "find", lambda: None)
    monkeypatch.setattr(haproxy_tool, "cannot_install", lambda: "installing needs root")
    assert haproxy_tool.provision() is None
    assert "haproxy: not installed: installing needs root" in capsys.readouterr().err
    with pytest.raises(haproxy_tool.HAProxyUnavailable, match="haproxy is not installed"):
        haproxy_tool.haproxy_path()


def test_an_haproxy_older_than_2_2_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert haproxy_tool.parse_version("HAProxy version 2.6.12-1+deb12u4 2026/10/17") == (2, 6)
    assert haproxy_tool.parse_version("HA-Proxy version 1.8.19 2019/02/11") == (1, 8)
    assert haproxy_tool.parse_version("command not found") is None
    monkeypatch.setattr(haproxy_tool, "find", lambda: "/opt/haproxy")
    monkeypatch.setattr(haproxy_tool, "version", lambda executable: (2, 0))
    with pytest.raises(haproxy_tool.HAProxyUnavailable, match=r"HAProxy 2\.0; .* needs 2\.2"):
        haproxy_tool.haproxy_path()
