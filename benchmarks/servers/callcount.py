"""Count the function calls a server makes in a window, from outside the server's own code.

Usage::

    python callcount.py --control-port PORT SCRIPT [ARGS...]

SCRIPT runs in this process as ``__main__``, exactly as ``python SCRIPT ARGS`` would run it:
the servers being compared contain no benchmark code.  Before it starts, a daemon thread
listens on 127.0.0.1:PORT (0: any free port; the first line on stderr names it) for control
connections, one command a line:

``start``
    installs a profiling hook (``sys.setprofile``) on the main thread, where the server's
    event loop runs, then answers ``started``;
``stop``
    removes it and answers one JSON line: the ``call`` and ``c_call`` events seen on the
    main thread in between, in total and per function.

Why a TCP control channel: the benchmark drives Windows CPython under Wine from Linux, and
POSIX signals do not reach it reliably there; a socket on the shared loopback does.  Why a
thread: the main thread sits inside the event loop (often blocked in a completion wait), and
only another thread can act at an exact moment without adding work to the loop.

What is counted: every ``call`` event is a Python function (or a coroutine or generator
resumed, which the profiler reports the same way); every ``c_call`` is a built-in function or
method called from Python code.  Calls a C extension loop (uvloop, winloop) makes inside
itself are invisible; the Python callbacks it runs are counted.  Everything the main thread
does in the window is included, the event loop's own iterations too: they are part of the
cost of an echo.

On Python 3.12+ the hook exists only for the window (``threading.setprofile_all_threads``,
filtered to the main thread).  On 3.11, which cannot set another thread's hook, a hook is
installed on the main thread from the start and counts only while the window is open: the
counts are the same, the server is just slower outside the window.

Only the standard library is used: it runs under the Windows embeddable CPython too.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

Hook = Callable[[FrameType, str, Any], object]


class Window:
    """The counts of one profiling window, collected by a hook on the main thread."""

    def __init__(self, main_thread: int) -> None:
        self.main_thread = main_thread
        self.python: dict[Any, int] = {}
        self.builtin: dict[Any, int] = {}
        self.open = False  # used by the 3.11 hook, which is always installed
        self.started = 0.0
        self.seconds = 0.0

    def make_hook(self, gated: bool) -> Hook:
        python, builtin = self.python, self.builtin
        main_thread, get_ident = self.main_thread, threading.get_ident

        def hook(frame: FrameType, event: str, arg: Any) -> None:
            # Kept small: it runs for every event of the window.
            if get_ident() != main_thread or (gated and not self.open):
                return
            if event == "call":
                code = frame.f_code
                python[code] = python.get(code, 0) + 1
            elif event == "c_call":
                try:
                    builtin[arg] = builtin.get(arg, 0) + 1
                except TypeError:  # an unhashable callable: count it under its type
                    builtin[type(arg)] = builtin.get(type(arg), 0) + 1

        return hook

    def report(self) -> dict[str, Any]:
        """Totals, and counts per function, most called first."""
        python = [
            [_code_label(code), os.path.basename(code.co_filename), code.co_firstlineno, n]
            for code, n in self.python.items()
        ]
        builtin: dict[str, int] = {}
        for func, n in self.builtin.items():
            label = _builtin_label(func)
            builtin[label] = builtin.get(label, 0) + n
        return {
            "python_calls": sum(entry[3] for entry in python),
            "c_calls": sum(builtin.values()),
            "seconds": self.seconds,
            "python": sorted(python, key=lambda entry: -entry[3]),
            "builtin": sorted(([label, n] for label, n in builtin.items()), key=lambda e: -e[1]),
            "method": "window" if hasattr(threading, "setprofile_all_threads") else "gated",
            "version": sys.version.split()[0],
        }


def _code_label(code: Any) -> str:
    return str(getattr(code, "co_qualname", code.co_name))


def _builtin_label(func: Any) -> str:
    """``type.method`` for a method, ``module.function`` for a function."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__self__", None)
    if owner is not None and not isinstance(owner, type(sys)) and "." not in name:
        return f"{type(owner).__name__}.{name}"
    module = getattr(func, "__module__", None)
    if module and "." not in name:
        return f"{module}.{name}"
    return str(name)


class Controller:
    """Opens and closes windows on command; one window at a time."""

    def __init__(self, main_thread: int) -> None:
        self.main_thread = main_thread
        self.window: Window | None = None
        self.gated_window: Window | None = None  # Python 3.11 only
        if not hasattr(threading, "setprofile_all_threads"):
            # Python 3.11: a hook set now, on the main thread, that counts only when open.
            self.gated_window = Window(main_thread)
            sys.setprofile(self.gated_window.make_hook(gated=True))

    def start(self) -> None:
        if self.window is not None:
            raise RuntimeError("a window is already open")
        if self.gated_window is not None:
            window = self.gated_window
            window.python.clear()
            window.builtin.clear()
            window.open = True
        else:
            window = Window(self.main_thread)
            threading.setprofile_all_threads(window.make_hook(gated=False))  # type: ignore[attr-defined]
        window.started = time.perf_counter()
        self.window = window

    def stop(self) -> dict[str, Any]:
        window = self.window
        if window is None:
            raise RuntimeError("no window is open")
        if self.gated_window is not None:
            window.open = False
        else:
            threading.setprofile_all_threads(None)  # type: ignore[attr-defined]
        window.seconds = time.perf_counter() - window.started
        self.window = None
        return window.report()

    def answer(self, command: str) -> str:
        try:
            if command == "start":
                self.start()
                return "started"
            if command == "stop":
                return json.dumps(self.stop())
        except RuntimeError as exc:
            return json.dumps({"error": str(exc)})
        return json.dumps({"error": f"unknown command {command!r}"})

    def serve(self, listener: socket.socket) -> None:
        while True:
            connection, _ = listener.accept()
            with connection, connection.makefile("rwb", buffering=0) as stream:
                for raw in stream:
                    answer = self.answer(raw.strip().decode("ascii", "replace"))
                    stream.write(answer.encode() + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", options.control_port))
    listener.listen(4)
    port = listener.getsockname()[1]
    print(f"callcount: control on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    controller = Controller(threading.get_ident())
    control = threading.Thread(target=controller.serve, args=(listener,), daemon=True)
    control.start()
    script = os.path.abspath(options.script)
    sys.argv = [options.script, *options.args]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
