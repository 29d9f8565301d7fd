"""The backend of the idle-connection test: echoes whatever each connection sends, and holds
thousands of connections open while they send nothing.

    python3 echo.py PORT
"""

import asyncio
import contextlib
import resource
import sys

LOOPBACK = "127.0.0.1"
BACKLOG = 4096  # the machine's somaxconn: connections arrive in bursts of hundreds


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass  # a peer reset is how some proxies close; nothing to report
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(echo, LOOPBACK, port, backlog=BACKLOG)
    print(f"echo: listening on {LOOPBACK}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: echo.py PORT")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(int(sys.argv[1])))
