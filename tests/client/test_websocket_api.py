"""`nym-client run` as applications written for Nym use it, against a real localnet.

The application side is written only from Nym's published WebSocket message formats
(`send`, `sendAnonymous`, `reply`, `selfAddress`, and `received` / `selfAddress` / `error`
answers), with the `websockets` package. Nothing here imports the project's code: the
localnet and the clients are the binaries `cargo test` built.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import websockets
import websockets.exceptions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BIN = None


def binaries():
    """Where `cargo test` left nym-node and nym-client (built once per session if needed)."""
    global _BIN
    if _BIN is None and os.environ.get("NYM_BIN_DIR"):
        # Measurements: the release binaries (target/release), built beforehand.
        _BIN = os.environ["NYM_BIN_DIR"]
    if _BIN is None:
        build = subprocess.run(["cargo", "test", "--workspace", "--locked", "--no-run"], cwd=ROOT,
                               capture_output=True, text=True)
        assert build.returncode == 0, build.stderr
        meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                                         cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        _BIN = os.path.join(meta["target_directory"], "debug")
    return _BIN


def free_base_port(span=100):
    for base in range(21000, 60000, span):
        try:
            socks = []
            for p in (base, base + span - 1):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            for s in socks:
                s.close()
            return base
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def localnet():
    """The README's localnet (two gateways), ready once a probe goes through."""
    tmp = tempfile.mkdtemp(prefix="nym-localnet-")
    base = free_base_port()
    proc = subprocess.Popen([os.path.join(binaries(), "nym-node"), "localnet", "--no-traffic",
                             "--base-port", str(base), "--dir", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    topology = os.path.join(tmp, "topology.json")
    deadline = time.time() + 90
    while time.time() < deadline:
        if os.path.exists(topology):
            probe = client(None, "--topology", topology,
                           "--topology-signer", os.path.join(tmp, "directory.pub"),
                           "--cover-rate", "0", "probe", "--count", "3", "--timeout", "20s",
                           check=False)
            if probe.returncode == 0:
                break
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("the localnet never carried a probe")
    with open(topology) as f:
        signed = json.load(f)
    # The localnet's directory signs the document (protocol.md §6).
    with open(os.path.join(tmp, "directory.pub")) as f:
        assert signed["signed_by"] == f.read().strip()
    gateways = [n for n in signed["document"]["nodes"] if n.get("client_address")]
    assert len(gateways) == 2, "the localnet has an entry and an exit gateway"
    yield topology
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def client(data_dir, *args, check=True, timeout=120):
    env = dict(os.environ)
    if data_dir:
        env["NYM_CLIENT_DATA_DIR"] = data_dir
    out = subprocess.run([os.path.join(binaries(), "nym-client"), *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"nym-client {' '.join(args)}: {out.stdout}{out.stderr}"
    return out


class Daemon:
    """`nym-client run --id NAME` on its own port."""

    def __init__(self, data_dir, name, *args):
        self.data_dir, self.name, self.port = data_dir, name, free_port()
        self.args = args
        self.proc = None

    def start(self):
        env = dict(os.environ, NYM_CLIENT_DATA_DIR=self.data_dir)
        rate = [] if "--cover-rate" in self.args else ["--cover-rate", "5"]
        self.proc = subprocess.Popen([os.path.join(binaries(), "nym-client"), "run", "--id", self.name,
                                      "--listen", f"127.0.0.1:{self.port}", *rate, *self.args],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} never served its API")

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.port}"

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0


async def request(ws, **msg):
    await ws.send(json.dumps(msg))


async def answer(ws, timeout=60):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def self_address(url, **connect):
    async with websockets.connect(url, **connect) as ws:
        await request(ws, type="selfAddress")
        got = await answer(ws, 10)
        assert got["type"] == "selfAddress", got
        return got["address"]


async def received(ws, n, timeout=60):
    out = []
    while len(out) < n:
        got = await answer(ws, timeout)
        assert got["type"] == "received", got
        out.append(got)
    return out


async def nothing_more(ws, seconds=3):
    try:
        extra = await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"delivered again: {extra}")


def signer_of(localnet):
    """The localnet's directory key, beside its topology."""
    return os.path.join(os.path.dirname(localnet), "directory.pub")


def make_clients(localnet, *names):
    data = tempfile.mkdtemp(prefix="nym-clients-")
    for name in names:
        client(data, "--topology", localnet, "--topology-signer", signer_of(localnet), "init", "--id", name)
    return data


def test_an_application_sends_replies_anonymously_and_learns_its_address(localnet):
    data = make_clients(localnet, "alice", "bob")
    alice, bob = Daemon(data, "alice").start(), Daemon(data, "bob").start()

    async def scenario():
        bob_address = await self_address(bob.url)
        alice_address = await self_address(alice.url)
        assert bob_address == client(data, "address", "--id", "bob").stdout.strip()
        async with websockets.connect(alice.url) as a, websockets.connect(bob.url) as b:
            # A plain send: the recipient gets the text and no way to answer.
            await request(a, type="send", recipient=bob_address, message="plain hello")
            [got] = await received(b, 1)
            assert got["message"] == "plain hello" and got["senderTag"] is None
            # An anonymous send carries SURBs; Bob answers by tag and never sees Alice's address.
            await request(a, type="sendAnonymous", recipient=bob_address, message="who am I?", replySurbs=3)
            [got] = await received(b, 1)
            assert got["message"] == "who am I?"
            tag = got["senderTag"]
            assert tag and alice_address not in json.dumps(got)
            for i in range(4):  # more replies than SURBs given: Bob's client asks for more
                await request(b, type="reply", senderTag=tag, message=f"answer {i}")
                [back] = await received(a, 1)
                assert back["message"] == f"answer {i}"
            # A one-shot `send` for a client that runs goes through the running client.
            out = await asyncio.to_thread(client, data, "send", "--id", "alice", "--to", bob_address,
                                          "--message", "one-shot")
            assert "running client" in out.stdout, out.stdout
            [got] = await received(b, 1)
            assert got["message"] == "one-shot"
            # Bad requests get Nym's error answer, naming what is wrong.
            await request(b, type="reply", senderTag="1" * 16, message="?")
            err = await answer(b, 10)
            assert err["type"] == "error" and "SURB" in err["message"], err
            await request(b, type="send", recipient="not-an-address", message="?")
            err = await answer(b, 10)
            assert err["type"] == "error" and "recipient" in err["message"], err
            # Nym's binary forms, from its published layout: answers come back binary too.
            await a.send(bytes([0x03]))  # selfAddress
            raw = await asyncio.wait_for(a.recv(), 10)
            assert isinstance(raw, bytes) and raw[0] == 0x02 and len(raw) == 1 + 96, raw
            alice_bytes = raw[1:]
            payload = bytes([0, 255, 1, 2]) + "héllo".encode()  # not UTF-8 as a whole
            frame = (bytes([0x00]) + alice_bytes + (7).to_bytes(8, "big")
                     + len(payload).to_bytes(8, "big") + payload)
            await b.send(frame)  # send, from Bob to Alice
            raw = await asyncio.wait_for(a.recv(), 60)
            assert raw[:2] == bytes([0x01, 0]), raw  # received, no sender tag
            assert int.from_bytes(raw[2:10], "big") == len(payload) and raw[10:] == payload
            await b.send(bytes([0x00, 0x01]))  # a send cut short
            raw = await asyncio.wait_for(b.recv(), 10)
            assert raw[0] == 0x00 and raw[1] == 0x02, raw  # error, TooShortRequest
            size = int.from_bytes(raw[2:10], "big")
            assert b"not enough data" in raw[10:10 + size]

    try:
        asyncio.run(scenario())
    finally:
        alice.stop()
        bob.stop()


def test_an_address_never_changes_and_mail_sent_to_it_arrives(localnet):
    data = make_clients(localnet, "carol")
    first = client(data, "address", "--id", "carol").stdout.strip()
    for _ in range(19):
        assert client(data, "address", "--id", "carol").stdout.strip() == first
    # Options after the subcommand work too, and a throwaway sender reaches the address.
    sent = client(None, "send", "--topology", localnet, "--topology-signer", signer_of(localnet),
                  "--cover-rate", "0", "--to", first,
                  "--message", "for carol")
    assert "delivered" in sent.stdout
    got = client(data, "receive", "--id", "carol", "--count", "1", "--timeout", "60s", "--cover-rate", "0")
    assert got.stdout.splitlines() == ["for carol"]


def test_sigkill_keeps_address_gateway_surbs_and_what_no_application_took(localnet):
    data = make_clients(localnet, "dave", "erin")
    dave, erin = Daemon(data, "dave").start(), Daemon(data, "erin").start()
    with open(os.path.join(data, "dave", "client.json")) as f:
        settings = json.load(f)

    async def before():
        dave_address = await self_address(dave.url)
        erin_address = await self_address(erin.url)
        async with websockets.connect(erin.url) as e, websockets.connect(dave.url) as d:
            await request(e, type="sendAnonymous", recipient=dave_address, message="keep my SURBs",
                          replySurbs=20)
            [got] = await received(d, 1)
        # No application is connected to Dave now: what arrives waits in his client, which has
        # not told the gateway to delete it.
        async with websockets.connect(erin.url) as e:
            for i in range(3):
                await request(e, type="send", recipient=dave_address, message=f"while away {i}")
        return dave_address, got["senderTag"]

    dave_address, tag = asyncio.run(before())
    time.sleep(8)  # the three reach Dave's client (and wait there for an application)
    dave.kill()
    dave = Daemon(data, "dave").start()

    async def after():
        async with websockets.connect(dave.url) as d, websockets.connect(erin.url) as e:
            # The first application to connect gets what waited, among its answers.
            await request(d, type="selfAddress")
            frames = [await answer(d) for _ in range(4)]
            [me] = [f for f in frames if f["type"] == "selfAddress"]
            assert me["address"] == dave_address
            got = [f for f in frames if f["type"] == "received"]
            assert sorted(g["message"] for g in got) == [f"while away {i}" for i in range(3)]
            # The SURBs Erin gave survive too: Dave answers her after the restart.
            await request(d, type="reply", senderTag=tag, message="still here")
            [back] = await received(e, 1)
            assert back["message"] == "still here"
            await nothing_more(d)

    try:
        asyncio.run(after())
        with open(os.path.join(data, "dave", "client.json")) as f:
            assert json.load(f) == settings, "the gateway is the one chosen at init"
    finally:
        dave.stop()
        erin.stop()


def test_a_client_offline_for_a_while_gets_what_was_sent_meanwhile_once(localnet):
    data = make_clients(localnet, "frank", "grace")
    frank_address = client(data, "address", "--id", "frank").stdout.strip()
    grace = Daemon(data, "grace").start()

    async def send_while_away():
        async with websockets.connect(grace.url) as g:
            for i in range(3):
                await request(g, type="send", recipient=frank_address, message=f"note {i}")

    asyncio.run(send_while_away())
    time.sleep(5)  # stored at Frank's gateway; Frank has never been online
    frank = Daemon(data, "frank").start()

    async def back_online():
        async with websockets.connect(frank.url) as f:
            got = await received(f, 3)
            assert sorted(g["message"] for g in got) == [f"note {i}" for i in range(3)]
            await nothing_more(f)

    try:
        asyncio.run(back_online())
        frank.stop()
        # Gone from the gateway once taken: a second session brings nothing again.
        frank = Daemon(data, "frank").start()

        async def again():
            async with websockets.connect(frank.url) as f:
                await nothing_more(f, 5)

        asyncio.run(again())
    finally:
        frank.stop()
        grace.stop()


def test_a_web_page_cannot_drive_the_client_unless_its_origin_is_allowed(localnet):
    """Browsers let any page open a WebSocket to 127.0.0.1 and send its Origin: the client
    serves native applications (no Origin) and the origins it was started for, no other."""
    data = make_clients(localnet, "heidi")
    heidi = Daemon(data, "heidi", "--allow-origin", "https://app.example").start()

    async def scenario():
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with websockets.connect(heidi.url, origin="https://evil.example") as ws:
                await request(ws, type="selfAddress")
                await answer(ws, 10)
        assert refused.value.response.status_code == 403
        async with websockets.connect(heidi.url, origin="https://app.example") as ws:
            await request(ws, type="selfAddress")
            got = await answer(ws, 10)
            assert got["type"] == "selfAddress", got
        assert await self_address(heidi.url), "a native application is served"

    try:
        asyncio.run(scenario())
    finally:
        heidi.stop()


def test_a_client_run_with_a_token_serves_only_who_presents_it(localnet):
    """`run --require-token`: a fresh token in run.json, asked of every connection; `send`
    and `receive` through the running client find it there."""
    data = make_clients(localnet, "ivan", "judy")
    ivan = Daemon(data, "ivan", "--require-token").start()
    with open(os.path.join(data, "ivan", "run.json")) as f:
        token = json.load(f)["token"]
    assert len(token) > 20

    async def scenario():
        for wrong in ({}, {"additional_headers": {"Authorization": "Bearer " + token[:-1]}}):
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                await self_address(ivan.url, **wrong)
            assert refused.value.response.status_code == 401
        by_header = await self_address(ivan.url, additional_headers={"Authorization": f"Bearer {token}"})
        by_query = await self_address(f"{ivan.url}/?token={token}")
        assert by_header == by_query
        return by_header

    try:
        address = asyncio.run(scenario())
        # Through the running client, both ways (judy holds her own session).
        judy = client(data, "address", "--id", "judy").stdout.strip()
        client(data, "send", "--id", "ivan", "--to", judy, "--message", "from ivan")
        got = client(data, "receive", "--id", "judy", "--count", "1", "--timeout", "60s")
        assert got.stdout.splitlines() == ["from ivan"]
        client(data, "send", "--id", "judy", "--to", address, "--message", "for ivan")
        got = client(data, "receive", "--id", "ivan", "--count", "1", "--timeout", "60s")
        assert got.stdout.splitlines() == ["for ivan"]
    finally:
        ivan.stop()
