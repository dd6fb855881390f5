"""What a passive observer of one client's link to its gateway learns: nothing of when the
client talks or receives.

Two `nym-client run` on the README's localnet; alice's session to her gateway goes through
a TCP relay that counts bytes each way (what anyone on the path sees: every frame has the
same size). Windows of the same length while alice is idle, while she sends 10 messages a
second to bob, and while bob sends her 10 a second. Each busy window's frame count must be
within Poisson noise of idle's (|z| <= 4), and the rates must be the ones the client asked
for: upstream its upstream plus loop rate, downstream the rate its gateway agreed to.

NYM_OBSERVER_WINDOW sets the window in seconds (CI: 20; the README's figures: 45). Run
after the cargo tests, not beside them: it measures rates.
"""

import asyncio
import json
import math
import os
import socket
import threading
import time

import websockets

from test_websocket_api import (Daemon, answer, client, localnet, make_clients,  # noqa: F401
                                request, self_address)

WINDOW = float(os.environ.get("NYM_OBSERVER_WINDOW", "20"))
UPSTREAM, LOOPS, DOWNSTREAM = 15.0, 3.0, 50.0
# A frame on the wire: the Noise transport message (2447 bytes) in a WebSocket binary
# message (4 header bytes, and a 4-byte mask from the client).
FRAME_UP, FRAME_DOWN = 2447 + 8, 2447 + 4


class CountingRelay:
    """Relays one TCP connection at a time to `target`, counting the bytes each way."""

    def __init__(self, target):
        self.target = target
        self.up = 0
        self.down = 0
        self.lock = threading.Lock()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            conn, _ = self.server.accept()
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(conn, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, "down"), daemon=True).start()

    def _pump(self, src, dst, direction):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counts(self):
        with self.lock:
            return self.up, self.down


def gateway_client_address(topology, address):
    """host, port of the client API of the gateway in a client address (IDENTITY.KEY@GATEWAY)."""
    gateway = address.split("@")[1]
    with open(topology) as f:
        nodes = json.load(f)["document"]["nodes"]
    [node] = [n for n in nodes if n["identity_key"] == gateway]
    host, port = node["client_address"].rsplit(":", 1)
    return host, int(port)


def z(busy, idle):
    """How far apart two Poisson counts of equal windows are, in standard deviations."""
    return (busy - idle) / math.sqrt(busy + idle)


async def window(relay, traffic):
    """Frames each way during WINDOW seconds while `traffic` runs."""
    task = asyncio.ensure_future(traffic()) if traffic else None
    up0, down0 = relay.counts()
    await asyncio.sleep(WINDOW)
    up1, down1 = relay.counts()
    if task:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    return (up1 - up0) / FRAME_UP, (down1 - down0) / FRAME_DOWN


def test_an_observer_of_the_link_cannot_tell_idle_from_sending_or_receiving(localnet):  # noqa: F811
    data = make_clients(localnet, "alice", "bob")
    alice_address = client(data, "address", "--id", "alice").stdout.strip()
    relay = CountingRelay(gateway_client_address(localnet, alice_address))
    rates = ("--cover-rate", str(UPSTREAM), "--loop-rate", str(LOOPS),
             "--downstream-rate", str(DOWNSTREAM))
    alice = Daemon(data, "alice", *rates, "--gateway-address", f"127.0.0.1:{relay.port}").start()
    bob = Daemon(data, "bob", *rates).start()
    got = {"alice": 0, "bob": 0}

    async def scenario():
        bob_address = await self_address(bob.url)
        assert await self_address(alice.url) == alice_address
        async with websockets.connect(alice.url) as a, websockets.connect(bob.url) as b:
            async def count(ws, name):
                while True:
                    msg = await answer(ws, 3600)
                    if msg["type"] == "received":
                        got[name] += 1

            counters = [asyncio.ensure_future(count(a, "alice")), asyncio.ensure_future(count(b, "bob"))]

            def sending(ws, to):
                async def run():
                    while True:
                        await request(ws, type="send", recipient=to, message="x" * 100)
                        await asyncio.sleep(0.1)
                return run

            await asyncio.sleep(5)  # past the session's start
            idle = await window(relay, None)
            before = dict(got)
            sent = await window(relay, sending(a, bob_address))
            await asyncio.sleep(5)  # what alice sent arrives; her acks come back
            bob_got = got["bob"] - before["bob"]
            before = dict(got)
            received = await window(relay, sending(b, alice_address))
            await asyncio.sleep(5)
            alice_got = got["alice"] - before["alice"]
            for c in counters:
                c.cancel()
            return idle, sent, received, bob_got, alice_got

    idle, sent, received, bob_got, alice_got = asyncio.run(scenario())
    alice.stop()
    bob.stop()
    report = (f"frames up/down in {WINDOW:.0f} s windows: idle {idle[0]:.0f}/{idle[1]:.0f}, "
              f"sending {sent[0]:.0f}/{sent[1]:.0f} (z {z(sent[0], idle[0]):+.1f}/{z(sent[1], idle[1]):+.1f}), "
              f"receiving {received[0]:.0f}/{received[1]:.0f} "
              f"(z {z(received[0], idle[0]):+.1f}/{z(received[1], idle[1]):+.1f}); "
              f"messages: bob got {bob_got}, alice got {alice_got}")
    print(report)
    # The traffic happened: most of the 10 a second arrived.
    expected = 10 * WINDOW
    assert bob_got >= 0.8 * expected and alice_got >= 0.8 * expected, report
    # The link runs at the rates asked for (Poisson: within 6 standard deviations) ...
    for up, down in (idle, sent, received):
        mean_up, mean_down = (UPSTREAM + LOOPS) * WINDOW, DOWNSTREAM * WINDOW
        assert abs(up - mean_up) < 6 * math.sqrt(mean_up), report
        assert abs(down - mean_down) < 6 * math.sqrt(mean_down), report
    # ... and busy looks like idle.
    for busy in (sent, received):
        assert abs(z(busy[0], idle[0])) <= 4, report
        assert abs(z(busy[1], idle[1])) <= 4, report
