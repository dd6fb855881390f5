"""Any IP traffic through the mixnet: `nym-client tun` and an exit's IP packet router.

Three network namespaces the test makes and removes:

    client ns ──veth 192.0.2.0/24── nodes ns ──veth 198.51.100.0/24, 2001:db8::/64── inet ns
    nym-client tun                  the localnet                                      HTTP, UDP echo,
    (its device, its routes)        (its exit runs the router:                        ping
                                     TUN, forwarding, NAT)

The client has a namespace of its own because a tunnel's addresses must not be local to the
router's host: if they were, answers would be delivered straight to them after de-NAT and
never cross the mixnet. The client reaches its gateway's client API (bound to loopback in
the nodes namespace) through a TCP forwarder on 192.0.2.1, with `--gateway-address`.

Through the tunnel: an HTTP fetch arrives byte-exact, a UDP echo comes back, ICMP echo
answers over IPv4 and IPv6; a destination the exit policy does not name is never reached and
is counted; after the client disconnects the router holds no lease; after the node stops its
NAT table is gone. NYM_TUN_MEASURE=1 also prints throughput, ping RTT and tunnel overhead.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from test_websocket_api import binaries, free_base_port

SUFFIX = str(os.getpid())
NS = {k: f"nymt-{k}-{SUFFIX}" for k in ("client", "nodes", "inet")}
INET4, INET6, REFUSED4 = "198.51.100.1", "2001:db8::1", "198.51.100.2"
UPLINK4, UPLINK6 = "198.51.100.254", "2001:db8::fe"
# NYM_TUN_BLOB_KB: the HTTP body (the README's figures: 400).
BLOB = os.urandom(int(os.environ.get("NYM_TUN_BLOB_KB", "96")) * 1024)
POLICY = f"""# the test's exit: only the "internet" namespace's first host
accept {INET4}:8080
accept udp {INET4}:7
accept icmp {INET4}
accept icmp [{INET6}]
"""


def sh(*args, check=True, ns=None, **kw):
    cmd = (["ip", "netns", "exec", NS[ns]] if ns else []) + list(args)
    kw.setdefault("text", True)
    out = subprocess.run(cmd, capture_output=True, **kw)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout!r}{out.stderr!r}"
    return out


def spawn(ns, *args, env=None, **kw):
    return subprocess.Popen(["ip", "netns", "exec", NS[ns], *args], env=env,
                            stdout=kw.pop("stdout", subprocess.DEVNULL),
                            stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)


def can_make_namespaces():
    if os.geteuid() != 0:
        return "not root: network namespaces and TUN devices need it"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this machine"
    for tool in ("ip", "nft", "ping", "curl"):
        if shutil.which(tool) is None:
            return f"no {tool} command"
    probe = f"nymt-probe-{SUFFIX}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"cannot make network namespaces: {out.stderr.strip()}"
    tun = subprocess.run(["ip", "netns", "exec", probe, "ip", "tuntap", "add", "mode", "tun", "t0"],
                         capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if tun.returncode != 0:
        return f"cannot make TUN devices: {tun.stderr.strip()}"
    return None


SERVERS = r"""
import http.server, socket, sys, threading
blob = open(sys.argv[1], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob)
    def log_message(self, *a):
        pass
def echo(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 7))
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(data, peer)
def sink(host, log):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 9))
    while True:
        s.recvfrom(65536)
        with open(log, "a") as f:
            f.write("got\n")
threading.Thread(target=echo, args=(sys.argv[2],), daemon=True).start()
threading.Thread(target=sink, args=(sys.argv[3], sys.argv[4]), daemon=True).start()
http.server.ThreadingHTTPServer((sys.argv[2], 8080), H).serve_forever()
"""

FORWARDER = r"""
import socket, sys, threading, time
listen, port, counts = sys.argv[1], int(sys.argv[2]), sys.argv[3]
moved = [0]
def report():
    while True:
        with open(counts + ".tmp", "w") as f:
            f.write(str(moved[0]))
        import os; os.replace(counts + ".tmp", counts)
        time.sleep(0.2)
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            moved[0] += len(d)
            b.sendall(d)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((listen, port))
srv.listen(16)
threading.Thread(target=report, daemon=True).start()
while True:
    c, _ = srv.accept()
    u = socket.create_connection(("127.0.0.1", port))
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    threading.Thread(target=pump, args=(u, c), daemon=True).start()
"""

UDP_ECHO_CLIENT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for attempt in range(12):
    s.sendto(b"echo through the mixnet %d" % attempt, (sys.argv[1], 7))
    try:
        data, _ = s.recvfrom(65536)
        print(data.decode())
        sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"""


class World:
    """The three namespaces, their links and the 'internet' servers."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        for ns in NS.values():
            sh("ip", "netns", "add", ns)
        for ns in NS:
            sh("ip", "link", "set", "lo", "up", ns=ns)
        # client ↔ nodes
        sh("ip", "link", "add", "c0", "netns", NS["client"], "type", "veth", "peer", "name", "n0",
           "netns", NS["nodes"])
        sh("ip", "addr", "add", "192.0.2.2/24", "dev", "c0", ns="client")
        sh("ip", "addr", "add", "192.0.2.1/24", "dev", "n0", ns="nodes")
        # nodes ↔ inet: the node's uplink
        sh("ip", "link", "add", "up0", "netns", NS["nodes"], "type", "veth", "peer", "name", "i0",
           "netns", NS["inet"])
        sh("ip", "addr", "add", f"{UPLINK4}/24", "dev", "up0", ns="nodes")
        sh("ip", "addr", "add", f"{UPLINK6}/64", "dev", "up0", "nodad", ns="nodes")
        for a in (f"{INET4}/24", f"{REFUSED4}/24"):
            sh("ip", "addr", "add", a, "dev", "i0", ns="inet")
        sh("ip", "addr", "add", f"{INET6}/64", "dev", "i0", "nodad", ns="inet")
        for ns, dev in (("client", "c0"), ("nodes", "n0"), ("nodes", "up0"), ("inet", "i0")):
            sh("ip", "link", "set", dev, "up", ns=ns)
        self.blob = os.path.join(tmp, "blob")
        with open(self.blob, "wb") as f:
            f.write(BLOB)
        self.sink_log = os.path.join(tmp, "refused-host.log")
        self.procs.append(spawn("inet", "python3", "-c", SERVERS, self.blob, INET4, REFUSED4, self.sink_log))

    def forward(self, port):
        """Forwards 192.0.2.1:port to the gateway, counting the bytes of the client's link."""
        self.link_bytes = os.path.join(self.tmp, "link-bytes")
        self.procs.append(spawn("nodes", "python3", "-c", FORWARDER, "192.0.2.1", str(port), self.link_bytes))
        deadline = time.time() + 10
        while not os.path.exists(self.link_bytes) and time.time() < deadline:
            time.sleep(0.1)

    def link(self):
        try:
            with open(self.link_bytes) as f:
                return int(f.read() or 0)
        except FileNotFoundError:
            return 0

    def close(self):
        for p in self.procs:
            p.kill()
        for ns in NS.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def metric(http_address, token, name, label=None):
    # The node's HTTP is in the nodes namespace: ask from there.
    out = sh("curl", "-s", "-H", f"Authorization: Bearer {token}", f"http://{http_address}/metrics", ns="nodes")
    total = 0.0
    for line in out.stdout.splitlines():
        if line.startswith(name) and (label is None or label in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def world():
    reason = can_make_namespaces()
    if reason:
        pytest.skip(f"IP tunnel test skipped: {reason}")
    tmp = tempfile.mkdtemp(prefix="nym-tun-")
    w = World(tmp)
    try:
        yield w
    finally:
        w.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def net(world):
    """The localnet in the nodes namespace, its exit running the router."""
    tmp = world.tmp
    policy = os.path.join(tmp, "exit-policy")
    with open(policy, "w") as f:
        f.write(POLICY)
    env = dict(os.environ, NYM_NODE_EXIT_POLICY=policy, NYM_NODE_IPR_ENABLED="true",
               NYM_NODE_IPR_DEVICE="nymipr0", NYM_NODE_IPR_IDLE_TIMEOUT="1m")
    base = free_base_port()
    d = os.path.join(tmp, "localnet")
    proc = spawn("nodes", os.path.join(binaries(), "nym-node"), "localnet", "--no-traffic",
                 "--base-port", str(base), "--dir", d, env=env)
    topology = os.path.join(d, "topology.json")
    deadline = time.time() + 120
    doc = None
    while time.time() < deadline:
        if os.path.exists(topology):
            with open(topology) as f:
                try:
                    doc = json.load(f)["document"]
                except json.JSONDecodeError:
                    doc = None
            if doc and any(n.get("ip_packet_router") for n in doc["nodes"]):
                break
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    else:
        doc = None
    if not doc or not any(n.get("ip_packet_router") for n in doc["nodes"]):
        logs = ""
        exit_log = os.path.join(d, "exit-gw", "node.log")
        if os.path.exists(exit_log):
            logs = open(exit_log).read()[-3000:]
        proc.kill()
        raise AssertionError(f"the localnet's exit never published an IP packet router:\n{logs}")
    nodes = {n["name"]: n for n in doc["nodes"]}
    entry = nodes["entry-gw"]
    world.forward(int(entry["client_address"].rsplit(":", 1)[1]))
    with open(os.path.join(d, "metrics.token")) as f:
        token = f.read().strip()
    info = {"dir": d, "topology": topology, "signer": os.path.join(d, "directory.pub"),
            "entry": entry, "exit": nodes["exit-gw"], "token": token, "proc": proc}
    yield info
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)


def start_tunnel(world, net, name="tun-a"):
    ready = os.path.join(world.tmp, f"{name}.ready")
    port = net["entry"]["client_address"].rsplit(":", 1)[1]
    log = open(os.path.join(world.tmp, f"{name}.log"), "w")
    proc = spawn("client", os.path.join(binaries(), "nym-client"),
                 "--topology", net["topology"], "--topology-signer", net["signer"],
                 "--gateway", net["entry"]["identity_key"], "--gateway-address", f"192.0.2.1:{port}",
                 "tun", "--device", name, "--route", "198.51.100.0/24", "--route", "2001:db8::/32",
                 "--ready-file", ready, stdout=log, stderr=log)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(ready):
        assert proc.poll() is None, open(log.name).read()
        time.sleep(0.2)
    assert os.path.exists(ready), f"the tunnel never came up:\n{open(log.name).read()}"
    with open(ready) as f:
        return proc, json.load(f), log.name


def test_ip_traffic_crosses_the_mixnet_and_refused_destinations_are_never_reached(world, net):
    exit_http = net["exit"]["http_address"]
    # The router's NAT table is in place while the node runs.
    assert "nym_node_ipr_nymipr0" in sh("nft", "list", "tables", ns="nodes").stdout
    proc, lease, log = start_tunnel(world, net)
    try:
        assert lease["ipv4"].startswith("10.64.") and lease["ipv6"].startswith("fd6e:796d:6970::")
        # HTTP: byte-exact.
        got = sh("curl", "-sS", "--max-time", "120", f"http://{INET4}:8080/blob", ns="client",
                 text=False).stdout
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(BLOB).hexdigest(), len(got)
        # UDP echo.
        echo = sh("python3", "-c", UDP_ECHO_CLIENT, INET4, ns="client")
        assert "echo through the mixnet" in echo.stdout
        # ICMP echo, both families.
        sh("ping", "-c", "3", "-W", "15", INET4, ns="client")
        sh("ping", "-6", "-c", "3", "-W", "15", INET6, ns="client")
        # The host the policy does not name: never reached, and counted.
        before = metric(exit_http, net["token"], "nym_node_ipr_refused_total", 'reason="no_rule"')
        for _ in range(5):
            sh("python3", "-c", f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                                f".sendto(b'x', ('{REFUSED4}', 9))", ns="client")
        deadline = time.time() + 60
        while time.time() < deadline:
            after = metric(exit_http, net["token"], "nym_node_ipr_refused_total", 'reason="no_rule"')
            if after >= before + 5:
                break
            time.sleep(1)
        assert after >= before + 5, (before, after)
        assert not os.path.exists(world.sink_log), "a refused destination was reached"
        # What went out left from the node's uplink, NATed (the servers saw the uplink's address).
        assert metric(exit_http, net["token"], "nym_node_ipr_packets_total", 'direction="to_internet"') > 0
        assert metric(exit_http, net["token"], "nym_node_ipr_packets_total", 'direction="to_clients"') > 0
        if os.environ.get("NYM_TUN_MEASURE") == "1":
            measure(world, net, log)
        assert metric(exit_http, net["token"], "nym_node_ipr_clients") == 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    # Ctrl-C: the device is gone, and the router gave the addresses back.
    assert sh("ip", "link", "show", "tun-a", ns="client", check=False).returncode != 0
    deadline = time.time() + 60
    while time.time() < deadline and metric(exit_http, net["token"], "nym_node_ipr_clients") != 0:
        time.sleep(1)
    assert metric(exit_http, net["token"], "nym_node_ipr_clients") == 0
    # A new client gets addresses from the pool again.
    proc, again, _ = start_tunnel(world, net, "tun-b")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert again["ipv4"].startswith("10.64.")


def test_the_nodes_nat_rules_are_gone_after_shutdown(world, net):
    proc = net["proc"]
    assert "nym_node_ipr_" in sh("nft", "list", "tables", ns="nodes").stdout
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=90)
    tables = sh("nft", "list", "tables", ns="nodes").stdout
    assert "nym_node_ipr_" not in tables, tables
    assert sh("ip", "link", "show", "nymipr0", ns="nodes", check=False).returncode != 0


def measure(world, net, log):
    """Figures for the README and the closing note (printed, never asserted)."""
    exit_http, token = net["exit"]["http_address"], net["token"]
    ip_bytes = lambda: metric(exit_http, token, "nym_node_ipr_bytes_total")
    ip0, link0, t0 = ip_bytes(), world.link(), time.time()
    got = sh("curl", "-sS", "--max-time", "600", "-o", "/dev/null", "-w", "%{size_download}",
             f"http://{INET4}:8080/blob", ns="client").stdout
    took = time.time() - t0
    time.sleep(0.5)
    ip, link = ip_bytes() - ip0, world.link() - link0
    print(f"\nTCP: {got} bytes in {took:.1f} s = {int(got) / took / 1024:.1f} KiB/s")
    print(f"overhead: {ip:.0f} bytes of IP packets (both ways) took {link} bytes on the client's link: "
          f"{100 * (1 - ip / link):.1f}% overhead (Sphinx, SURBs, acks, cover)")
    pings = sh("ping", "-c", "40", "-i", "0.5", "-W", "20", INET4, ns="client", check=False).stdout
    rtts = sorted(float(line.split("time=")[1].split()[0]) for line in pings.splitlines() if "time=" in line)
    if rtts:
        p = lambda q: rtts[min(len(rtts) - 1, int(q * len(rtts)))]
        print(f"ping: {len(rtts)}/40 answered, RTT p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms")
