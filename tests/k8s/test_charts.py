"""The charts as operators render them: every value means what it says, secrets stay secret,
drains finish, renders are reproducible, and every pod meets the restricted Pod Security
Standard. One case per defect a review against a real cluster found (README "Helm charts")."""

import glob
import json
import os
import re
import tempfile

import pytest
import yaml

import pod_security
from k8s_tools import (NODE_CHART, OPERATOR_CHART, ROOT, built_binaries, cargo_bin, docs,
                       pod_specs, render, render_text, run)

NODE_VALUES = [None] + sorted(glob.glob(os.path.join(NODE_CHART, "ci", "*.yaml")))
OPERATOR_VALUES = [None] + sorted(glob.glob(os.path.join(OPERATOR_CHART, "ci", "*.yaml")))


def values_args(values):
    return ["-f", values] if values else []


def env_configmap(objects):
    return next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-env"))


def statefulset_pod(objects):
    return next(o for o in objects if o["kind"] == "StatefulSet")["spec"]["template"]["spec"]


def check_env(data):
    """Runs the node's own parser (`nym-node check-env`) over a rendered env ConfigMap."""
    with tempfile.NamedTemporaryFile("w", suffix=".env") as f:
        for k, v in data.items():
            f.write(f"{k}={v}\n")
        f.flush()
        return run(os.path.join(built_binaries(), "nym-node"), "check-env", "--file", f.name, check=False)


# --- values that mean what they say ------------------------------------------------------

def test_every_knob_renders_as_the_node_reads_it_even_as_a_large_yaml_integer():
    with open(os.path.join(NODE_CHART, "values.schema.json")) as f:
        knobs = json.load(f)["properties"]["config"]["properties"]
    integers = {k: s for k, s in knobs.items()
                if any(alt.get("type") == "integer" and alt.get("enum") is None for alt in s.get("anyOf", []))}
    assert len(integers) > 10, integers
    # Each integer knob as a big bare YAML number, the way an operator writes values files.
    big = {}
    for knob, schema in integers.items():
        limit = next(alt.get("maximum") for alt in schema["anyOf"] if alt.get("type") == "integer")
        big[knob] = limit if limit is not None else 2147483648
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump({"config": big}, f)
        f.flush()
        for args in ([], ["-f", f.name]):
            data = env_configmap(render(NODE_CHART, *args))["data"]
            for knob in integers:
                assert re.fullmatch(r"[0-9]+", data[knob]), f"{knob} rendered as {data[knob]!r}"
            out = check_env(data)
            assert out.returncode == 0, out.stderr
    data = env_configmap(render(NODE_CHART, "-f", os.path.join(NODE_CHART, "ci", "everything-values.yaml")))["data"]
    assert data["NYM_NODE_MAILBOX_MAX_BYTES"] == "2147483648"
    assert data["NYM_NODE_SPHINX_QUEUE"] == "1000000"
    assert check_env(data).returncode == 0


def test_gateways_render_with_only_their_mode():
    for mode in ("entry-gateway", "exit-gateway"):
        objects = render(NODE_CHART, "--set", f"mode={mode}")
        assert env_configmap(objects)["data"]["NYM_NODE_MODE"] == mode
    # A layer on a gateway is still refused, and named.
    out = run("helm", "template", "r", NODE_CHART, "--set", "mode=entry-gateway", "--set", "layer=2", check=False)
    assert out.returncode != 0 and "gateways have no layer" in out.stderr


def test_the_ip_packet_router_opt_in_grants_exactly_what_the_router_needs():
    plain = statefulset_pod(render(NODE_CHART, "--set", "mode=exit-gateway"))
    node = next(c for c in plain["containers"] if c["name"] == "nym-node")
    assert node["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "sysctls" not in plain["securityContext"]
    objects = render(NODE_CHART, "-f", os.path.join(NODE_CHART, "ci", "exit-gateway-ip-router-values.yaml"))
    pod = statefulset_pod(objects)
    node = next(c for c in pod["containers"] if c["name"] == "nym-node")
    sc = node["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "MKNOD", "DAC_OVERRIDE", "FOWNER"]}
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # Only the node container: the init containers keep the restricted context.
    for init in pod["initContainers"]:
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}, init["name"]
    assert {s["name"]: s["value"] for s in pod["securityContext"]["sysctls"]} == {
        "net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
    data = env_configmap(objects)["data"]
    assert data["NYM_NODE_IPR_ENABLED"] == "true"
    assert check_env(data).returncode == 0
    # Sysctls of the operator's own are kept beside the router's; the opt-in holds even with
    # the knob dropped from config (a null in values) or no pod security context at all.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump({"mode": "exit-gateway", "ipPacketRouter": {"enabled": True},
                        "config": {"NYM_NODE_IPR_ENABLED": None},
                        "podSecurityContext": {"sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "1"}]}}, f)
        f.flush()
        objects = render(NODE_CHART, "-f", f.name)
    names = [s["name"] for s in statefulset_pod(objects)["securityContext"]["sysctls"]]
    assert names == ["net.ipv4.tcp_syncookies", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
    assert env_configmap(objects)["data"]["NYM_NODE_IPR_ENABLED"] == "true"
    bare = render(NODE_CHART, "--set", "mode=exit-gateway", "--set", "ipPacketRouter.enabled=true",
                  "--set", "podSecurityContext=null")
    assert len(statefulset_pod(bare)["securityContext"]["sysctls"]) == 2


def test_errors_point_at_the_check_not_at_the_checksum_line():
    out = run("helm", "template", "r", NODE_CHART, "--set", "mode=entry-gateway", "--set", "layer=2", check=False)
    assert "templates/validate.yaml" in out.stderr, out.stderr
    assert "statefulset.yaml" not in out.stderr, out.stderr


def test_the_schema_refuses_malformed_durations_integers_and_enums():
    for knob, value in (("NYM_NODE_DRAIN_GRACE", "30"), ("NYM_NODE_SPHINX_QUEUE", "lots"),
                        ("NYM_NODE_LOG_FORMAT", "yaml"), ("NYM_NODE_CLIENT_RATE", "-1")):
        out = run("helm", "template", "r", NODE_CHART, "--set-string", f"config.{knob}={value}", check=False)
        assert out.returncode != 0, f"{knob}={value} rendered"
        assert knob in out.stderr, out.stderr


# --- secrets ----------------------------------------------------------------------------

def test_existing_secret_provides_identity_and_noise_keys_only_and_only_when_absent():
    objects = render(NODE_CHART, "-f", os.path.join(NODE_CHART, "ci", "everything-values.yaml"))
    pod = statefulset_pod(objects)
    init = {c["name"]: c for c in pod["initContainers"]}
    assert list(init) == ["keys", "keygen"], "the Secret's keys first, then keygen for the rest"
    copy = " ".join(init["keys"]["command"])
    assert "sphinx" not in copy, "the Sphinx seed never comes from the Secret"
    assert "[ -e /var/lib/nym-node/keys/$f ] && continue" in copy, "keys on the volume are kept"
    secret = next(v for v in pod["volumes"] if v["name"] == "secret-keys")["secret"]
    assert sorted(i["key"] for i in secret["items"]) == ["identity.key", "noise.key"]
    assert init["keygen"]["args"][:2] == ["keygen", "--if-missing"]


def run_key_copy(script, volume, secret):
    """The keys init container's script, run by sh against two temporary directories."""
    script = script.replace("/var/lib/nym-node/keys", volume).replace("/run/nym-node/secret-keys", secret)
    return run("sh", "-c", script, check=False)


def test_the_key_copy_survives_a_missing_secret_and_never_invents_an_identity():
    objects = render(NODE_CHART, "--set", "keys.existingSecret=my-keys")
    pod = statefulset_pod(objects)
    script = next(c for c in pod["initContainers"] if c["name"] == "keys")["command"][2]
    volume = next(v for v in pod["volumes"] if v["name"] == "secret-keys")["secret"]
    assert volume["optional"] is True, "a deleted Secret must not hold the pod in ContainerCreating"
    with tempfile.TemporaryDirectory() as tmp:
        vol, sec = os.path.join(tmp, "vol"), os.path.join(tmp, "sec")
        os.makedirs(sec)
        # First start: both keys come from the Secret, 0600.
        for f in ("identity.key", "noise.key"):
            with open(os.path.join(sec, f), "w") as out:
                out.write(f"secret {f}")
        assert run_key_copy(script, vol, sec).returncode == 0
        for f in ("identity.key", "noise.key"):
            assert os.stat(os.path.join(vol, f)).st_mode & 0o777 == 0o600
        # The Secret is gone later (or lacks noise.key): the volume's keys stand, no error.
        for f in os.listdir(sec):
            os.remove(os.path.join(sec, f))
        with open(os.path.join(vol, "identity.key"), "w") as out:
            out.write("kept")
        assert run_key_copy(script, vol, sec).returncode == 0
        with open(os.path.join(vol, "identity.key")) as f:
            assert f.read() == "kept"
        # Neither place has an identity: stop with the Secret's name, never make a new one.
        os.remove(os.path.join(vol, "identity.key"))
        out = run_key_copy(script, vol, sec)
        assert out.returncode != 0 and "my-keys" in out.stderr and "identity.key" in out.stderr
        assert not os.path.exists(os.path.join(vol, "identity.key"))


def test_the_metrics_token_comes_from_a_secret_the_service_monitor_shares():
    objects = render(NODE_CHART, "-f", os.path.join(NODE_CHART, "ci", "everything-values.yaml"))
    for cm in (o for o in objects if o["kind"] == "ConfigMap"):
        assert "NYM_NODE_METRICS_TOKEN" not in (cm.get("data") or {}), cm["metadata"]["name"]
    container = statefulset_pod(objects)["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    ref = env["NYM_NODE_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "nym-metrics-token", "key": "token"}
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    credentials = monitor["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert credentials == ref
    # And the token may not be given in plain config (tests/k8s/bad-values too).
    out = run("helm", "template", "r", NODE_CHART, "--set", "config.NYM_NODE_METRICS_TOKEN=x", check=False)
    assert out.returncode != 0 and "NYM_NODE_METRICS_TOKEN" in out.stderr


@pytest.mark.parametrize("chart,values", [(NODE_CHART, v) for v in NODE_VALUES] + [(OPERATOR_CHART, v) for v in OPERATOR_VALUES],
                         ids=lambda v: os.path.basename(v) if isinstance(v, str) else "defaults")
def test_renders_are_identical_every_time(chart, values):
    """GitOps: Argo CD, helm-diff and `helm template` must see the same bytes twice."""
    first = render_text(chart, *values_args(values))
    second = render_text(chart, *values_args(values))
    assert first == second


# --- drains -----------------------------------------------------------------------------

def test_the_disruption_budget_always_lets_a_drain_finish():
    pdb = next(o for o in render(NODE_CHART) if o["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["maxUnavailable"] >= 1
    for value in ("0", "0%"):
        out = run("helm", "template", "r", NODE_CHART, "--set-string" if "%" in value else "--set",
                  f"podDisruptionBudget.maxUnavailable={value}", check=False)
        assert out.returncode != 0 and "maxUnavailable" in out.stderr, value
    operator_pdb = next(o for o in render(OPERATOR_CHART) if o["kind"] == "PodDisruptionBudget")
    assert operator_pdb["spec"] == {**operator_pdb["spec"], "minAvailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow"}


# --- pods -------------------------------------------------------------------------------

def test_probes_and_security_contexts_are_values():
    pod = statefulset_pod(render(NODE_CHART))
    node = pod["containers"][0]
    assert node["startupProbe"]["httpGet"]["path"] == "/livez"
    assert node["startupProbe"]["failureThreshold"] * node["startupProbe"]["periodSeconds"] >= 300
    assert pod["securityContext"]["runAsUser"] == 10001
    custom = statefulset_pod(render(NODE_CHART, "--set", "livenessProbe.periodSeconds=30",
                                    "--set", "startupProbe=null"))
    assert custom["containers"][0]["livenessProbe"]["periodSeconds"] == 30
    assert "startupProbe" not in custom["containers"][0]
    openshift = statefulset_pod(render(NODE_CHART, "-f", os.path.join(NODE_CHART, "ci", "openshift-values.yaml")))
    for field in ("runAsUser", "runAsGroup", "fsGroup"):
        assert field not in openshift["securityContext"], "OpenShift assigns it"
    assert openshift["securityContext"]["runAsNonRoot"] is True


def test_the_operator_chart_runs_under_openshift_and_its_test_pod_is_placed_like_the_operator():
    objects = render(OPERATOR_CHART, "-f", os.path.join(OPERATOR_CHART, "ci", "openshift-values.yaml"))
    for where, spec in pod_specs(objects):
        for field in ("runAsUser", "runAsGroup", "fsGroup"):
            assert field not in spec.get("securityContext", {}), f"{where}: OpenShift assigns {field}"
    placed = ["--set", "imagePullSecrets[0].name=registry", "--set", "nodeSelector.pool=ops",
              "--set", "tolerations[0].operator=Exists"]
    for chart in (NODE_CHART, OPERATOR_CHART):
        specs = dict(pod_specs(render(chart, *placed)))
        for where, spec in specs.items():
            assert spec["imagePullSecrets"] == [{"name": "registry"}], where
            assert spec["nodeSelector"] == {"pool": "ops"}, where
            assert spec["tolerations"] == [{"operator": "Exists"}], where
            for c in spec["containers"]:
                assert c.get("imagePullPolicy") == "IfNotPresent", f"{where}: {c['name']}"


def test_keygen_reads_the_node_env():
    pod = statefulset_pod(render(NODE_CHART))
    keygen = next(c for c in pod["initContainers"] if c["name"] == "keygen")
    assert keygen["envFrom"] == pod["containers"][0]["envFrom"]


@pytest.mark.parametrize("chart,values", [(NODE_CHART, v) for v in NODE_VALUES] + [(OPERATOR_CHART, v) for v in OPERATOR_VALUES],
                         ids=lambda v: os.path.basename(v) if isinstance(v, str) else "defaults")
def test_every_container_has_resources(chart, values):
    """Namespaces with a ResourceQuota refuse a pod whose containers name no resources."""
    for where, spec in pod_specs(render(chart, *values_args(values))):
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c.get("resources", {}).get("requests"), f"{where}: {c['name']} has no requests"


def test_the_test_pod_is_selected_by_no_service_or_budget():
    objects = render(NODE_CHART, "--set", "replicaServices.enabled=true")
    test_pod = next(o for o in objects if o["kind"] == "Pod")
    labels = test_pod["metadata"]["labels"]
    for o in objects:
        selector = (o["spec"].get("selector") if o["kind"] == "Service"
                    else (o["spec"].get("selector") or {}).get("matchLabels") if o["kind"] == "PodDisruptionBudget"
                    else None)
        if selector:
            assert not all(labels.get(k) == v for k, v in selector.items()), f"{o['kind']}/{o['metadata']['name']} selects the test pod"


def test_long_release_names_still_fit_statefulset_labels():
    # Helm allows 53 characters; with "-nym-node" appended the name would reach 62.
    release = "a-very-long-release-name-for-a-layer-two-mix-grp-x"
    assert len(release) <= 53 and len(release) + len("-nym-node") > 52
    objects = render(NODE_CHART, release=release)
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    name = sts["metadata"]["name"]
    # The controller-revision-hash label is the name, a dash and a 10-character hash.
    assert len(name) <= 52 and len(f"{name}-0123456789") <= 63, name
    for o in objects:
        if o["kind"] == "Service":
            assert len(o["metadata"]["name"]) <= 63, o["metadata"]["name"]
        for value in (o["metadata"].get("labels") or {}).values():
            assert len(value) <= 63, value


def test_long_release_names_fit_the_operator_chart_and_long_overrides_are_refused():
    release = "a-very-long-release-name-for-the-mixnet-operator-xyz"
    assert len(release) == 52
    for o in render(OPERATOR_CHART, release=release):
        limit = 63 if o["kind"] == "Service" else 253
        assert len(o["metadata"]["name"]) <= limit, o["metadata"]["name"]
        for value in (o["metadata"].get("labels") or {}).values():
            assert len(value) <= 63, value
    for chart in (NODE_CHART, OPERATOR_CHART):
        out = run("helm", "template", "r", chart, "--set", "nameOverride=" + "n" * 60, check=False)
        assert out.returncode != 0 and "nameOverride" in out.stderr, out.stderr


@pytest.mark.parametrize("chart,values", [(NODE_CHART, v) for v in NODE_VALUES] + [(OPERATOR_CHART, v) for v in OPERATOR_VALUES],
                         ids=lambda v: os.path.basename(v) if isinstance(v, str) else "defaults")
def test_every_pod_meets_the_restricted_pod_security_standard(chart, values):
    for where, spec in pod_specs(render(chart, *values_args(values))):
        found = pod_security.violations(spec)
        if isinstance(values, str) and values.endswith("ip-router-values.yaml") and "StatefulSet" in where:
            # The router's opt-in leaves the restricted profile on purpose, and only as its
            # values document says: the forwarding sysctls, root and two capabilities in
            # the node container.
            assert found and all(("sysctl net.ipv" in v and "forwarding" in v or "ip_forward" in v)
                                 or "nym-node" in v for v in found), found
            continue
        assert found == [], where


def test_the_operator_builds_pods_that_meet_the_restricted_standard():
    for example in sorted(glob.glob(os.path.join(ROOT, "k8s-operator", "examples", "*.yaml"))):
        objects = docs(cargo_bin("nym-operator", "render", example).stdout)
        for where, spec in pod_specs(objects):
            assert pod_security.violations(spec) == [], f"{example}: {where}"


def test_the_pod_security_check_catches_what_restricted_refuses():
    spec = statefulset_pod(render(NODE_CHART))
    assert pod_security.violations(spec) == []
    bad = json.loads(json.dumps(spec))
    bad["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    bad["initContainers"][0]["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    bad["securityContext"].pop("seccompProfile")
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = "\n".join(pod_security.violations(bad))
    for expected in ("allowPrivilegeEscalation", "NET_ADMIN", "seccompProfile", "hostPath"):
        assert expected in found, found


def test_no_yaml_anchors_in_rendered_output():
    for chart, values in [(NODE_CHART, v) for v in NODE_VALUES] + [(OPERATOR_CHART, v) for v in OPERATOR_VALUES]:
        text = render_text(chart, *values_args(values))
        anchors = re.findall(r"(?m)(?::|^\s*-)\s+[&*][A-Za-z0-9_-]+\s*$", text)
        assert not anchors, f"{chart} {values}: {anchors}"


# --- monitoring -------------------------------------------------------------------------

def test_two_releases_monitoring_objects_never_collide():
    sets = ["--set", "serviceMonitor.enabled=true", "--set", "metrics.tokenSecret.name=nym-metrics-token", "--set", "prometheusRule.enabled=true",
            "--set", "dashboards.enabled=true"]
    first = render(NODE_CHART, *sets, release="mix-l1")
    second = render(NODE_CHART, *sets, release="mix-l2")

    def uids(objects):
        out = set()
        for o in objects:
            if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]:
                out |= {json.loads(v)["uid"] for v in o["data"].values()}
        return out

    def groups(objects):
        rule = next(o for o in objects if o["kind"] == "PrometheusRule")
        return {g["name"] for g in rule["spec"]["groups"]}

    def dashboard_keys(objects):
        return {k for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]
                for k in o["data"]}

    def instance_variables(objects):
        return [v for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]
                for text in o["data"].values() for v in json.loads(text)["templating"]["list"]
                if v["name"] == "instance"]

    assert uids(first) and uids(first).isdisjoint(uids(second))
    # Grafana's sidecar writes every key into one folder: one release must not overwrite another.
    assert dashboard_keys(first) and dashboard_keys(first).isdisjoint(dashboard_keys(second))
    for variable in instance_variables(first):
        # "All" means this release's instances, not every instance Prometheus holds.
        assert "allValue" not in variable
        assert 'nym_release="mixnet/mix-l1"' in variable["query"]["query"]
    assert all(len(u) <= 40 for u in uids(first)), "Grafana uids hold 40 characters"
    assert groups(first).isdisjoint(groups(second))
    for objects, release in ((first, "mix-l1"), (second, "mix-l2")):
        rule = next(o for o in objects if o["kind"] == "PrometheusRule")
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                assert r["expr"].endswith(f'up{{nym_release="mixnet/{release}"}}'), r["expr"]
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump(rule["spec"], f)
            f.flush()
            out = run("promtool", "check", "rules", f.name, check=False)
            assert out.returncode == 0, out.stdout + out.stderr


# --- charts as packages -----------------------------------------------------------------

@pytest.mark.parametrize("chart", [NODE_CHART, OPERATOR_CHART], ids=os.path.basename)
def test_kubernetes_before_1_28_is_refused(chart):
    out = run("helm", "template", "r", chart, "--kube-version", "1.27.0", check=False)
    assert out.returncode != 0 and "kubeVersion" in (out.stderr + out.stdout), out.stderr
    run("helm", "template", "r", chart, "--kube-version", "1.28.0")
    with open(os.path.join(chart, "Chart.yaml")) as f:
        meta = yaml.safe_load(f)
    assert meta["kubeVersion"] == ">=1.28.0-0"
    assert meta["icon"].startswith("https://")


def test_chart_readmes_are_generated_from_the_values():
    out = run("python3", os.path.join(ROOT, "scripts", "helm-docs.py"), "--check", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    with open(os.path.join(NODE_CHART, "README.md")) as f:
        node = f.read()
    assert "need a directory of their own" in node
    assert "| `config.NYM_NODE_SPHINX_QUEUE` |" in node
    with open(os.path.join(OPERATOR_CHART, "README.md")) as f:
        operator = f.read()
    assert "kubectl apply --server-side -f helm/nym-operator/crds/nymnodes.yaml" in operator


def test_operator_notes_say_how_to_read_the_directory_key():
    out = run("helm", "install", "nym-operator", OPERATOR_CHART, "--namespace", "nym-operator",
              "--dry-run=client", check=False)
    assert out.returncode == 0, out.stderr
    assert "get configmap nym-operator-directory -o jsonpath='{.data.publicKey}'" in out.stdout, out.stdout
    # Helm never upgrades crds/: the notes say how.
    assert "kubectl apply --server-side -f helm/nym-operator/crds/nymnodes.yaml" in out.stdout


def test_node_notes_say_chart_nodes_need_a_directory_of_their_own():
    out = run("helm", "install", "mix", NODE_CHART, "--namespace", "mixnet", "--dry-run=client", check=False)
    assert out.returncode == 0, out.stderr
    notes = " ".join(out.stdout.split())
    assert "lists only the pods it manages" in notes and "a directory of their own" in notes, out.stdout


def test_the_example_network_follows_the_chart_version():
    with open(os.path.join(OPERATOR_CHART, "Chart.yaml")) as f:
        app = yaml.safe_load(f)["appVersion"]
    objects = render(OPERATOR_CHART, "--set", "exampleNetwork.enabled=true")
    images = {o["spec"]["image"] for o in objects if o["kind"] == "NymNode"}
    assert images == {f"ghcr.io/nym-node-rs/nym-node:{app}"}


def test_the_operator_chart_has_ci_values_a_test_a_budget_and_spread():
    assert len(OPERATOR_VALUES) > 1
    objects = render(OPERATOR_CHART)
    test = next(o for o in objects if o["kind"] == "Pod")
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert any(o["kind"] == "PodDisruptionBudget" for o in objects)
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] == "nym-operator"
