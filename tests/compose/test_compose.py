#!/usr/bin/env python3
"""Container tests: the compose testnet built from this repository's Dockerfile, with real faults.

Run by scripts/test.sh (needs Docker and Compose v2; it never skips). Each test prints what it
measured. Everything it creates carries the compose project label `nymtest` and is removed at
the end, whatever happens.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = "nymtest"
NETWORK = f"{PROJECT}_default"
MIXES = ["mix-1a", "mix-1b", "mix-2a", "mix-2b", "mix-3a", "mix-3b"]
NODES = MIXES + ["entry-gw", "exit-gw"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = dict(os.environ, PROMETHEUS_PORT=str(free_port()), ENTRY_GW_PORT=str(free_port()),
           GRAFANA_PORT=str(free_port()), SOCKS5_PORT=str(free_port()))
COMPOSE = ["docker", "compose", "-p", PROJECT, "-f", "docker-compose.yml",
           "-f", "tests/compose/docker-compose.test.yml"]


def log(msg):
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, check=True, capture=True, timeout=900, env=None):
    r = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def compose(*args, **kw):
    return run(COMPOSE + list(args), **kw)


def container(service):
    return compose("ps", "-q", service).stdout.strip()


PROBE_RE = re.compile(r"sent=(\d+) delivered=(\d+) failed=(\d+) duplicates=(\d+) retransmissions=(\d+).*p50_ms=([\d.]+) p99_ms=([\d.]+) elapsed_s=([\d.]+)")


def probe_cmd(count, cover_rate=20, retransmissions=6, timeout="180s", mean_delay="50ms"):
    return COMPOSE + ["run", "--rm", "--no-deps", "-T", "--entrypoint", "nym-client", "traffic",
                      "--topology", "/data/topology.json", "--topology-signer", "/data/directory.pub",
                      "--cover-rate", str(cover_rate),
                      "--max-retransmissions", str(retransmissions), "--mean-delay", mean_delay,
                      "probe", "--count", str(count), "--timeout", timeout]


def parse_probe(out):
    m = PROBE_RE.search(out)
    assert m, f"no probe summary in:\n{out}"
    keys = ["sent", "delivered", "failed", "duplicates", "retransmissions"]
    r = {k: int(m.group(i + 1)) for i, k in enumerate(keys)}
    r.update(p50_ms=float(m.group(6)), p99_ms=float(m.group(7)), elapsed_s=float(m.group(8)))
    return r


def probe(count, **kw):
    r = run(probe_cmd(count, **kw), check=False, timeout=600)
    return parse_probe(r.stdout + r.stderr)


class Background:
    """A probe running while a fault is injected."""

    def __init__(self, count, **kw):
        self.p = subprocess.Popen(probe_cmd(count, **kw), cwd=ROOT, env=ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.started = time.time()

    def result(self):
        out, _ = self.p.communicate(timeout=900)
        return parse_probe(out)


def prometheus(query):
    url = f"http://127.0.0.1:{ENV['PROMETHEUS_PORT']}/api/v1/query?query={urllib.parse.quote(query)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        data = json.load(r)
    return {tuple(sorted(x["metric"].items())): float(x["value"][1]) for x in data["data"]["result"]}


def metric_sum(query):
    try:
        return sum(prometheus(query).values())
    except Exception:
        return None


def wait_healthy(services, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {}
        for s in services:
            cid = container(s)
            if not cid:
                states[s] = "missing"
                continue
            st = run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid], check=False).stdout.strip()
            states[s] = st
        if all(v == "healthy" for v in states.values()):
            return time.time()
        time.sleep(1)
    raise AssertionError(f"not healthy in {timeout}s: {states}")


def json_logs(service):
    out = compose("logs", "--no-color", "--no-log-prefix", service).stdout
    lines = []
    for line in out.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def drained_summary(service):
    """The `pipeline drained` line of the service's last shutdown."""
    found = [l for l in json_logs(service) if l.get("fields", {}).get("message") == "pipeline drained"]
    assert found, f"{service} logged no drain summary"
    return found[-1]["fields"]


# ---------------------------------------------------------------- tests

def test_testnet_comes_up_and_delivers():
    t = time.time()
    compose("up", "-d", "--wait", timeout=600)
    log(f"testnet up and healthy in {time.time() - t:.1f}s")
    r = probe(30, cover_rate=0)
    log(f"probe: {r}")
    assert r["delivered"] == r["sent"] == 30, r
    # Prometheus scrapes every node.
    deadline = time.time() + 60
    up = None
    while time.time() < deadline:
        up = metric_sum('sum(up{job="nym-node"})')
        if up == len(NODES):
            break
        time.sleep(2)
    assert up == len(NODES), f"Prometheus sees {up} of {len(NODES)} nodes up"
    log("prometheus: every node scraped and up")
    # The traffic client probes without end and Prometheus scrapes its rounds: end-to-end
    # delivery as the network dashboard shows it, with the network's alert rules loaded.
    deadline = time.time() + 120
    delivered = None
    while time.time() < deadline:
        delivered = metric_sum('sum(nym_client_probe_messages_total{job="nym-probe", result="delivered"})')
        if delivered:
            break
        time.sleep(2)
    assert delivered, "Prometheus saw no probe message delivered by the traffic client"
    with urllib.request.urlopen(f"http://127.0.0.1:{ENV['PROMETHEUS_PORT']}/api/v1/rules", timeout=5) as r:
        groups = {g["name"] for g in json.load(r)["data"]["groups"]}
    assert {"nym-node", "nym-network"} <= groups, groups
    layers = prometheus('max by (layer) (nym_node_topology_nodes{mode="mixnode", serving="true"})')
    assert sorted(dict(k)["layer"] for k, v in layers.items() if v == 2) == ["1", "2", "3"], layers
    log(f"prometheus: the traffic client delivered {delivered:.0f} probe message(s); two serving nodes per layer")
    # The directory signs the document; every node was started requiring its key.
    doc = json.loads(compose("exec", "-T", "mix-1a", "cat", "/data/topology.json").stdout)
    signer = compose("exec", "-T", "mix-1a", "cat", "/data/directory.pub").stdout.strip()
    assert doc["signed_by"] == signer and doc["signature"], doc.keys()
    # The exit runs the IP packet router: published in its entry, counted by Prometheus.
    exit_entry = next(n for n in doc["document"]["nodes"] if n["name"] == "exit-gw")
    assert exit_entry.get("ip_packet_router", "").endswith("@" + exit_entry["identity_key"]), exit_entry
    assert metric_sum('sum(nym_node_ipr_clients{instance="exit-gw"})') == 0
    assert "running" in compose("ps", "--format", "{{.State}}", "directory").stdout
    log(f"topology revision {doc['document']['revision']} signed by the directory {signer[:8]}")


def test_socks5_fetch_leaves_at_the_exit():
    """curl on the host, through the socks5 service, the mixnet and exit-gw, to mix-1a's
    HTTP API (named by service name: the exit resolves it)."""
    url = "http://mix-1a:8080/api/v1/description"
    proxy = f"127.0.0.1:{ENV['SOCKS5_PORT']}"
    deadline, r = time.time() + 90, None
    while time.time() < deadline:
        t = time.time()
        r = run(["curl", "-sS", "--max-time", "60", "--socks5-hostname", proxy, url], check=False)
        if r.returncode == 0:
            break
        time.sleep(2)  # the proxy may still be connecting to its gateway
    assert r.returncode == 0, f"curl through the compose exit failed: {r.stderr}"
    took = time.time() - t
    description = json.loads(r.stdout)["description"]
    assert description["name"] == "mix-1a" and description["mode"] == "mixnode", description
    log(f"socks5: {len(r.stdout)} bytes from {url} through exit-gw in {took:.2f}s")
    deadline, opened = time.time() + 30, None
    while time.time() < deadline and not opened:
        opened = metric_sum('sum(nym_node_exit_streams_opened_total{instance="exit-gw"})')
        time.sleep(1)
    assert opened and opened >= 1, f"Prometheus sees exit-gw open {opened} streams"
    log(f"prometheus: exit-gw opened {opened:.0f} stream(s)")
    # A target the policy does not name is refused with a SOCKS5 failure reply.
    r = run(["curl", "-sS", "--max-time", "60", "--socks5-hostname", proxy, "http://mix-1a:1789/"],
            check=False)
    assert r.returncode == 97, f"expected a SOCKS5 refusal, got {r.returncode}: {r.stderr}"


def test_graceful_stop_loses_nothing():
    # Long per-hop delays, so the node still holds packets when its grace period ends.
    bg = Background(120, cover_rate=20, mean_delay="1s", timeout="240s")
    time.sleep(3)
    t = time.time()
    compose("stop", "mix-2a", timeout=60)
    stopped_in = time.time() - t
    r = bg.result()
    summary = drained_summary("mix-2a")
    released = [l["fields"] for l in json_logs("mix-2a")
                if l.get("fields", {}).get("message") == "forwarder stopping: released every held packet"]
    log(f"stop (drain) mix-2a: stopped in {stopped_in:.1f}s, drain summary {summary}, "
        f"held packets released at the end {released}, probe {r}")
    assert summary["dropped"] == 0, summary
    assert summary["forwarded"] == summary["received"], "every packet the node accepted left it"
    if summary["released_early"] > 0:
        assert released and released[-1]["released_early"] == summary["released_early"], released
    assert r["delivered"] == r["sent"], f"messages lost end to end: {r}"
    compose("start", "mix-2a")
    wait_healthy(["mix-2a"])


def test_sigkill_and_restart_recovers():
    bg = Background(120, cover_rate=20)
    time.sleep(3)
    compose("kill", "-s", "SIGKILL", "mix-1b")
    killed = time.time()
    time.sleep(5)
    compose("start", "mix-1b")
    wait_healthy(["mix-1b"])
    r = bg.result()
    # Recovery: how soon after the restart a fresh probe through the network succeeds in full.
    while True:
        q = probe(10, cover_rate=0)
        if q["delivered"] == q["sent"]:
            break
        assert time.time() - killed < 120, "traffic never recovered"
    recovered = time.time() - killed
    log(f"SIGKILL mix-1b, restarted after 5s: probe during the fault {r}; "
        f"full delivery again {recovered:.1f}s after the kill")
    assert r["delivered"] == r["sent"], f"with acks no message is lost: {r}"
    assert r["retransmissions"] > 0, "the loss was real and repaired by retransmission"


def test_network_partition_backs_off_and_recovers():
    cid = container("mix-3a")
    before_reconnects = metric_sum("sum(nym_node_network_egress_reconnects_total)") or 0
    bg = Background(700, cover_rate=20, retransmissions=30, timeout="300s")
    time.sleep(3)
    run(["docker", "network", "disconnect", NETWORK, cid])
    cut = time.time()
    time.sleep(30)
    # Reconnect with the service alias, or the name stops resolving.
    run(["docker", "network", "connect", "--alias", "mix-3a", NETWORK, cid])
    healed = time.time()
    r = bg.result()
    deadline = time.time() + 60
    reconnects = before_reconnects
    while time.time() < deadline:
        reconnects = metric_sum("sum(nym_node_network_egress_reconnects_total)") or 0
        if reconnects > before_reconnects:
            break
        time.sleep(2)
    backoff = metric_sum('sum(nym_node_packets_dropped_total{reason=~"backoff|unreachable"})')
    q = probe(20, cover_rate=0)
    log(f"partition mix-3a for {healed - cut:.0f}s: peers dropped {backoff} packets while backing off, "
        f"reconnects {before_reconnects} -> {reconnects}; probe across the partition {r}; probe after {q}")
    assert reconnects > before_reconnects, "peers reconnected after the partition"
    assert r["delivered"] == r["sent"], f"traffic recovered and retransmission filled the gap: {r}"
    assert q["delivered"] == q["sent"], q


def test_rolling_upgrade_loses_nothing():
    t = time.time()
    run(COMPOSE + ["build", "init"], env=dict(ENV, NYM_NODE_VERSION="0.1.1-upgrade"), timeout=900)
    log(f"rebuilt the image with a new version label in {time.time() - t:.1f}s")
    bg = Background(400, cover_rate=20, retransmissions=20, timeout="300s")
    time.sleep(2)
    for mix in MIXES:
        t = time.time()
        compose("up", "-d", "--no-deps", "--wait", mix, timeout=300)
        log(f"  {mix} recreated and ready in {time.time() - t:.1f}s")
    r = bg.result()
    versions = {}
    for mix in MIXES:
        image = run(["docker", "inspect", "-f", "{{.Image}}", container(mix)]).stdout.strip()
        versions[mix] = run(["docker", "inspect", "-f",
                             '{{index .Config.Labels "org.opencontainers.image.version"}}', image]).stdout.strip()
    log(f"rolling upgrade: versions {versions}; probe throughout {r}")
    assert all(v == "0.1.1-upgrade" for v in versions.values()), versions
    assert r["delivered"] == r["sent"], f"zero messages lost: {r}"


def test_down_leaves_nothing():
    compose("down", "-v", "--remove-orphans", timeout=300)
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {
        "containers": run(["docker", "ps", "-aq", "--filter", label]).stdout.split(),
        "networks": run(["docker", "network", "ls", "-q", "--filter", label]).stdout.split(),
        "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]).stdout.split(),
    }
    log(f"after down -v: {left}")
    assert not any(left.values()), left


def cleanup():
    compose("down", "-v", "--remove-orphans", check=False, timeout=300)
    # Only images this test built and replaced (dangling, with our project label).
    run(["docker", "image", "prune", "-f", "--filter", f"label=com.docker.compose.project={PROJECT}"], check=False)


def main():
    t0 = time.time()
    run(["scripts/base-images.sh"], capture=False, timeout=900)
    t = time.time()
    compose("build", timeout=1800, capture=False)
    log(f"images built in {time.time() - t:.0f}s")
    size = run(["docker", "image", "inspect", "-f", "{{.Size}}", "nym-node:local"]).stdout.strip()
    log(f"nym-node image size: {int(size) / 1e6:.1f} MB")
    tests = [test_testnet_comes_up_and_delivers, test_socks5_fetch_leaves_at_the_exit,
             test_graceful_stop_loses_nothing,
             test_sigkill_and_restart_recovers, test_network_partition_backs_off_and_recovers,
             test_rolling_upgrade_loses_nothing, test_down_leaves_nothing]
    only = sys.argv[1:]
    failed = []
    try:
        for test in tests:
            if only and test.__name__ not in only and test is not test_down_leaves_nothing \
                    and test is not test_testnet_comes_up_and_delivers:
                continue
            t = time.time()
            log(f"{test.__name__} ...")
            try:
                test()
                log(f"{test.__name__} ok ({time.time() - t:.0f}s)")
            except Exception as e:  # report every failure, keep going
                failed.append(test.__name__)
                log(f"{test.__name__} FAILED: {e}")
                for s in NODES:
                    tail = compose("logs", "--no-color", "--tail", "15", s, check=False).stdout
                    print(tail[-3000:], flush=True)
    finally:
        cleanup()
    log(f"container tests took {time.time() - t0:.0f}s; {len(failed)} failed {failed}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
