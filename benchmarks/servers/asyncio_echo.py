"""The peers' echo servers on asyncio, as vmbench's asyncioecho: the stock Protocol echo
(``loop.create_server``) or the streams echo (``asyncio.start_server``: read, write, drain),
on any loop of ``loopchoice.py`` (the default loop: selector on Linux, proactor on Windows;
uvloop, winloop, rloop, uringcore, or iocp_echo's own loop).  Prints READY and the loop's
class once listening."""

import argparse
import asyncio
import sys
from pathlib import Path

# The embeddable Windows CPython (under Wine) does not put the script's folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import loopchoice


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def echo_stream(reader, writer):
    while data := await reader.read(102400):
        writer.write(data)
        await writer.drain()
    writer.close()


async def main(options):
    loop = asyncio.get_running_loop()
    if options.streams:
        server = await asyncio.start_server(echo_stream, "127.0.0.1", options.port, limit=1 << 20)
    else:
        server = await loop.create_server(EchoProtocol, "127.0.0.1", options.port, backlog=1024)
    print("READY", loopchoice.describe(loop), flush=True)
    # Serving since create_server/start_server returned; not serve_forever(), which on
    # rloop 0.5.0 starts serving a second time and so stops listening (connection refused).
    async with server:
        await loop.create_future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", action="store_true")
    parser.add_argument("--loop", choices=loopchoice.NAMES, default="default")
    parser.add_argument("--site", help="extra folder for sys.path (winloop under Wine)")
    options = parser.parse_args()
    with asyncio.Runner(loop_factory=loopchoice.factory(options.loop, options.site)) as runner:
        runner.run(main(options))
