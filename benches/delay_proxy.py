#!/usr/bin/env python3
"""A delay-line TCP proxy: every byte is forwarded DELAY_MS later, in each direction, so a
connection through it sees a round trip of 2 x DELAY_MS more (this kernel has no netem).

    delay_proxy.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS

Bandwidth is not limited here (benches/ssh.sh shapes the link with tc tbf). Stops on SIGTERM.
"""
import asyncio
import signal
import sys
import time


async def pipe(reader, writer, delay):
    q = asyncio.Queue()

    async def later():
        while True:
            due, data = await q.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.ensure_future(later())
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            q.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    q.put_nowait((0, None))
    try:
        await sender
    except ConnectionError:
        pass


async def main():
    lhost, lport, thost, tport, delay_ms = sys.argv[1:6]
    delay = float(delay_ms) / 1000

    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, sw, delay), pipe(sr, cw, delay))

    server = await asyncio.start_server(handle, lhost, int(lport))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


asyncio.run(main())
