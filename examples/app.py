"""An application on iocp_echo's loop: a subprocess, a SIGTERM handler and an echo server.

``python examples/app.py [PORT]`` prints ``echo on port N`` once it serves, and stops
cleanly on SIGTERM (or Ctrl-C).  Everything runs on one loop, ``iocp_echo.run()``'s.
"""

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import iocp_echo


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:  # Windows: Ctrl-C arrives as KeyboardInterrupt
            pass

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import platform; print(platform.platform())",
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await child.communicate()
    print("child says", output.decode().strip(), "and exits with", child.returncode)

    async with await iocp_echo.serve_echo("127.0.0.1", port) as server:
        print("echo on port", server.port, flush=True)
        await stop.wait()
    print("stopped", flush=True)


if __name__ == "__main__":
    iocp_echo.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
