"""The peers' echo servers on asyncio, as vmbench's asyncioecho: the stock Protocol echo or
the streams echo, on the default loop (selector on Linux, proactor on Windows), uvloop or
winloop.  Prints READY once listening."""

import argparse
import asyncio
import sys


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
    print("READY", type(loop).__name__, flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", action="store_true")
    parser.add_argument("--loop", choices=["default", "uvloop", "winloop"], default="default")
    parser.add_argument("--site", help="extra folder for sys.path (winloop under Wine)")
    options = parser.parse_args()
    if options.site:
        sys.path.insert(0, options.site)
    factory = None
    if options.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    elif options.loop == "winloop":
        import winloop

        factory = winloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(options))
