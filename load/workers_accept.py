"""How two asyncio processes on one port split a burst of connections: one inherited listening
socket, or a socket each in one SO_REUSEPORT group (what `workers: N` does,
gateway/workers/listener.py).

    .venv/bin/python load/workers_accept.py [--connections 256] [--processes 2] [--rounds 3]

The connections are opened all at once, after both processes listen; each process counts the
ones it accepted. Under both the asyncio loop and uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import time
from typing import Any


def listening(reuseport: bool, port: int = 0, listen: bool = True) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    if listen:
        sock.listen(2048)
    return sock


def serve(shared: socket.socket | None, port: int, loop: str, counts: Any, ready: Any) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.install()
    sock = shared if shared is not None else listening(True, port)
    accepted = 0

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            await reader.read(1)
            writer.close()

        await asyncio.start_server(handle, sock=sock, backlog=2048)
        ready.release()
        await asyncio.sleep(4)
        counts.put(accepted)

    asyncio.run(main())


def split(mode: str, loop: str, connections: int, processes: int) -> list[int]:
    reuseport = mode == "reuseport"
    base = listening(reuseport, listen=not reuseport)  # reuseport: a holder that never listens
    port = base.getsockname()[1]
    counts: Any = mp.Queue()
    ready: Any = mp.Semaphore(0)
    shared = None if reuseport else base
    procs = [
        mp.Process(target=serve, args=(shared, port, loop, counts, ready)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.acquire()
    time.sleep(0.5)

    async def burst() -> None:
        opened = [asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
        pairs = await asyncio.gather(*opened)
        await asyncio.sleep(1)
        for _, writer in pairs:
            writer.write(b"x")
        await asyncio.sleep(0.5)

    asyncio.run(burst())
    result = sorted(counts.get() for _ in procs)
    for proc in procs:
        proc.join()
    base.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    mp.set_start_method("fork")
    print("| listening | loop | accepted per process, each round |")
    print("|---|---|---|")
    for mode in ("shared", "reuseport"):
        for loop in ("asyncio", "uvloop"):
            rounds = [
                split(mode, loop, args.connections, args.processes) for _ in range(args.rounds)
            ]
            print(f"| {mode} | {loop} | {'; '.join(' / '.join(map(str, r)) for r in rounds)} |")


if __name__ == "__main__":
    main()
