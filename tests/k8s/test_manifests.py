"""Every Kubernetes object this project produces is checked against the real schemas.

- Both Helm charts: `helm lint --strict`, and `helm template` with the default values and the
  `ci/` values files; every rendered object validated by kubernetes-validate (strict, for
  Kubernetes K8S_VERSION); ServiceMonitor and PrometheusRule against the prometheus-operator
  CRD models (cloudcoil-models-prometheus-operator 0.80.1.0, generated from prometheus-operator
  v0.80.1's CRDs), with unknown fields refused.
- The PrometheusRules carry exactly grafana/alerts.yml (node chart) and grafana/network-alerts.yml
  (operator chart) and pass `promtool check rules`; the charts' dashboards are grafana/dashboards'.
- Bad values are refused by the schema (or the chart's own checks) with a clear message.
- The operator: the CRD validates, the chart's copy equals `crdgen` byte for byte, every
  object `nym-operator render` builds for the examples validates, the example NymNodes pass
  the CRD's openAPIV3Schema and its CEL rules, and the invalid ones are refused.
- The chart's `config:` block is the node's own knob definitions (`nym-node config-docs`).
"""

import glob
import json
import os
import tempfile

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from k8s_tools import (K8S_VERSION, NODE_CHART, OPERATOR_CHART, ROOT, cargo_bin, docs, render,
                       run)


# --- validation against schemas -------------------------------------------------------------

def prometheus_operator_model(kind):
    from cloudcoil.models.prometheus_operator import v1
    return getattr(v1, kind)


def dropped_keys(given, kept, path=""):
    """Keys of `given` that a model did not keep: fields the CRD does not know."""
    missing = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for k, v in given.items():
            if k not in kept:
                missing.append(f"{path}.{k}")
            else:
                missing += dropped_keys(v, kept[k], f"{path}.{k}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept)):
            missing += dropped_keys(a, b, f"{path}[{i}]")
    return missing


def validate(doc):
    kind = doc.get("kind")
    if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        model = prometheus_operator_model(kind).model_validate(doc)
        kept = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
        unknown = dropped_keys(doc, kept)
        assert not unknown, f"{kind}: fields the CRD does not define: {unknown}"
    elif doc.get("apiVersion", "").startswith("mixnet.nym-node.dev/"):
        validate_nymnode(doc)
    else:
        # Raises on any error, including unknown fields (strict) and unknown kinds.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def crd():
    return yaml.safe_load(cargo_bin("crdgen").stdout)


def structural_to_jsonschema(node):
    """openAPIV3Schema as JSON Schema: nullable, int-or-string, and no unknown fields."""
    if not isinstance(node, dict):
        return node
    out = {k: structural_to_jsonschema(v) if isinstance(v, dict) else
           ([structural_to_jsonschema(i) for i in v] if isinstance(v, list) else v)
           for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out:
        out["properties"] = {k: structural_to_jsonschema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = structural_to_jsonschema(node["additionalProperties"])
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = out["enum"] + [None]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


_CRD = None


def validate_nymnode(doc):
    global _CRD
    if _CRD is None:
        _CRD = crd()
    version = _CRD["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    jsonschema.validate(body, structural_to_jsonschema({k: v for k, v in schema.items()
                                                        if k != "properties"} | {
        "type": "object",
        "properties": {k: v for k, v in schema["properties"].items() if k not in ("apiVersion", "kind", "metadata")}}))
    # CEL rules, as the API server evaluates them.
    env = celpy.Environment()
    spec_schema = schema["properties"]["spec"]
    # Rules at the root see the object's metadata.name (the only metadata CEL may read).
    whole = {**body, "metadata": {"name": doc["metadata"]["name"]}}
    for rules, subject in ((schema.get("x-kubernetes-validations", []), whole),
                           (spec_schema.get("x-kubernetes-validations", []), doc["spec"])):
        for rule in rules:
            program = env.program(env.compile(rule["rule"]))
            result = program.evaluate({"self": celpy.json_to_cel(subject)})
            if not bool(result):
                raise jsonschema.ValidationError(rule["message"])


# --- the charts ---------------------------------------------------------------------------

@pytest.mark.parametrize("chart", [NODE_CHART, OPERATOR_CHART])
def test_helm_lint_strict(chart):
    out = run("helm", "lint", "--strict", chart, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


NODE_VALUES = [None] + sorted(glob.glob(os.path.join(NODE_CHART, "ci", "*.yaml")))


@pytest.mark.parametrize("values", NODE_VALUES, ids=lambda v: os.path.basename(v) if v else "defaults")
def test_node_chart_renders_only_valid_objects(values):
    objects = render(NODE_CHART, *(["-f", values] if values else []))
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "Pod"} <= kinds
    for o in objects:
        validate(o)
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "checksum/config" in sts["spec"]["template"]["metadata"]["annotations"]


def test_everything_enabled_renders_monitoring_policy_and_dashboards():
    objects = render(NODE_CHART, "-f", os.path.join(NODE_CHART, "ci", "everything-values.yaml"))
    kinds = [o["kind"] for o in objects]
    for kind in ("ServiceMonitor", "PrometheusRule", "NetworkPolicy"):
        assert kind in kinds
    dashboards = [o for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]
    # The node's own dashboard (the operator chart ships the network's).
    assert len(dashboards) == len(glob.glob(os.path.join(NODE_CHART, "files", "dashboards", "*.json"))) == 1
    for d in dashboards:
        for key, text in d["data"].items():
            # One data key per release (the Grafana sidecar writes them all into one folder).
            assert key.startswith("mixnet-"), key
            name = next(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "grafana", "dashboards", "*.json"))
                        if key.endswith("-" + os.path.basename(p)))
            with open(os.path.join(ROOT, "grafana", "dashboards", name)) as f:
                original = json.load(f)
            shipped = json.loads(text)
            # The release's own uid, title and node selector; every panel exactly as in grafana/.
            for key in ("uid", "title", "templating"):
                shipped.pop(key), original.pop(key)
            assert shipped == original


def test_an_exit_policy_is_mounted_and_named_by_the_env():
    objects = render(NODE_CHART, "-f", os.path.join(NODE_CHART, "ci", "exit-gateway-loadbalancer-values.yaml"))
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    policy = next(m for n, m in maps.items() if n.endswith("-exit-policy"))
    assert policy["data"]["exit-policy.txt"].splitlines() == ["reject *:25", "accept *:80,443"]
    env = next(m for n, m in maps.items() if n.endswith("-env"))
    path = env["data"]["NYM_NODE_EXIT_POLICY"]
    pod = next(o for o in objects if o["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "exit-policy")
    assert path == mount["mountPath"] + "/exit-policy.txt"
    volume = next(v for v in pod["volumes"] if v["name"] == "exit-policy")
    assert volume["configMap"]["name"] == policy["metadata"]["name"]
    # Without a policy nothing is mounted and the node uses its default.
    plain = render(NODE_CHART, "--set", "mode=exit-gateway", "--set", "layer=null")
    assert not any(o["metadata"]["name"].endswith("-exit-policy") for o in plain)
    env = next(o for o in plain if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-env"))
    assert env["data"]["NYM_NODE_EXIT_POLICY"] == ""


def test_a_config_change_changes_the_pod_template_checksum():
    def checksum(*args):
        sts = next(o for o in render(NODE_CHART, *args) if o["kind"] == "StatefulSet")
        return sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum() != checksum("--set", "config.NYM_NODE_CLIENT_RATE=100")


def test_prometheus_rule_is_the_alerts_scoped_to_the_release_and_passes_promtool():
    objects = render(NODE_CHART, "--set", "prometheusRule.enabled=true", "--set", "serviceMonitor.enabled=true",
                     "--set", "metrics.tokenSecret.name=nym-metrics-token")
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    with open(os.path.join(ROOT, "grafana", "alerts.yml")) as f:
        alerts = yaml.safe_load(f)
    scope = ' and on (instance) up{nym_release="mixnet/release"}'
    assert len(rule["spec"]["groups"]) == len(alerts["groups"])
    for shipped, original in zip(rule["spec"]["groups"], alerts["groups"]):
        assert shipped["name"] == original["name"] + "-mixnet/release"
        for s, o in zip(shipped["rules"], original["rules"], strict=True):
            assert s["expr"] == f"({o['expr'].strip()}){scope}"
            assert {k: v for k, v in s.items() if k != "expr"} == {k: v for k, v in o.items() if k != "expr"}
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    labels = {r["targetLabel"]: r["replacement"] for r in monitor["spec"]["endpoints"][0]["relabelings"]}
    assert labels["nym_release"] == "mixnet/release"
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(rule["spec"], f)
        f.flush()
        out = run("promtool", "check", "rules", f.name, check=False)
        assert out.returncode == 0, out.stdout + out.stderr


def test_chart_copies_of_alerts_and_dashboards_are_identical():
    grafana = os.path.join(ROOT, "grafana")
    pairs = [
        ("alerts.yml", os.path.join(NODE_CHART, "files", "alerts.yml")),
        ("dashboards/nym-node.json", os.path.join(NODE_CHART, "files", "dashboards", "nym-node.json")),
        ("network-alerts.yml", os.path.join(OPERATOR_CHART, "files", "network-alerts.yml")),
        ("dashboards/nym-network.json", os.path.join(OPERATOR_CHART, "files", "dashboards", "nym-network.json")),
        ("dashboards/nym-node.json", os.path.join(OPERATOR_CHART, "files", "dashboards", "nym-node.json")),
    ]
    for original, copy_ in pairs:
        with open(os.path.join(grafana, original), "rb") as a, open(copy_, "rb") as b:
            assert a.read() == b.read(), f"{copy_} differs from grafana/{original}: copy it again"
    # Every dashboard is shipped by some chart; the node chart ships only the node's.
    shipped = {os.path.basename(c) for _, c in pairs}
    for d in glob.glob(os.path.join(grafana, "dashboards", "*.json")):
        assert os.path.basename(d) in shipped, f"{d} is shipped by no chart"
    assert os.listdir(os.path.join(NODE_CHART, "files", "dashboards")) == ["nym-node.json"]


def test_operator_chart_ships_the_network_rules_and_dashboards():
    objects = render(OPERATOR_CHART, "--set", "prometheusRule.enabled=true", "--set", "dashboards.enabled=true",
                     "--set", "serviceMonitor.enabled=true")
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    with open(os.path.join(ROOT, "grafana", "network-alerts.yml")) as f:
        groups = yaml.safe_load(f)["groups"]
    assert rule["spec"]["groups"][:-1] == groups
    absent = rule["spec"]["groups"][-1]["rules"]
    assert [r["alert"] for r in absent] == ["NymOperatorAbsent"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "rules.yml"), "w") as f:
            yaml.safe_dump(rule["spec"], f)
        out = run("promtool", "check", "rules", os.path.join(d, "rules.yml"), check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        # NymOperatorAbsent: fires with no operator scraped, silent with one.
        absent_test = {
            "rule_files": ["rules.yml"],
            "evaluation_interval": "1m",
            "tests": [
                {"interval": "1m", "input_series": [{"series": 'up{job="other"}', "values": "1x30"}],
                 "alert_rule_test": [{"eval_time": "20m", "alertname": "NymOperatorAbsent", "exp_alerts": [
                     {"exp_labels": {"severity": "critical"},
                      "exp_annotations": {"summary": absent[0]["annotations"]["summary"]}}]}]},
                {"interval": "1m", "input_series": [{"series": 'nym_operator_leader{instance="op-0"}', "values": "1x30"}],
                 "alert_rule_test": [{"eval_time": "20m", "alertname": "NymOperatorAbsent", "exp_alerts": []}]},
            ],
        }
        with open(os.path.join(d, "test.yml"), "w") as f:
            yaml.safe_dump(absent_test, f)
        out = run("promtool", "test", "rules", os.path.join(d, "test.yml"), check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    dashboards = {}
    for cm in (o for o in objects if o["kind"] == "ConfigMap" and "-dashboard-" in o["metadata"]["name"]):
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        for key, text in cm["data"].items():
            dashboards[key] = json.loads(text)
    for name in ("nym-network.json", "nym-node.json"):
        with open(os.path.join(ROOT, "grafana", "dashboards", name)) as f:
            assert dashboards[name] == json.load(f)
    # The network dashboard's node links open the node dashboard the chart ships.
    links = [l["url"] for p in dashboards["nym-network.json"]["panels"]
             for o in p.get("fieldConfig", {}).get("overrides", []) for prop in o["properties"]
             if prop["id"] == "links" for l in prop["value"]]
    assert links and all(u.startswith(f"/d/{dashboards['nym-node.json']['uid']}/") for u in links), links
    # The operator's metrics describe other namespaces: their own namespace label must win.
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


BAD_VALUES = sorted(glob.glob(os.path.join(ROOT, "tests", "k8s", "bad-values", "*.yaml")))


@pytest.mark.parametrize("values", BAD_VALUES, ids=os.path.basename)
def test_bad_values_are_refused_with_a_clear_message(values):
    with open(values) as f:
        expect = f.readline().removeprefix("# expect:").strip()
    out = run("helm", "template", "release", NODE_CHART, "-f", values, check=False)
    assert out.returncode != 0, f"{values} was accepted"
    assert expect in out.stderr, out.stderr


def test_chart_config_block_and_its_schema_are_the_node_knob_definitions():
    generated = cargo_bin("nym-node", "config-docs", "--format", "helm-values").stdout
    with open(os.path.join(NODE_CHART, "values.yaml")) as f:
        values = f.read()
    block = values.split("# knobs:start\n", 1)[1].split("# knobs:end", 1)[0]
    assert block == generated, "helm/nym-node/values.yaml config block is stale: regenerate it"
    with open(os.path.join(NODE_CHART, "values.schema.json")) as f:
        schema = json.load(f)
    generated = json.loads(cargo_bin("nym-node", "config-docs", "--format", "helm-schema").stdout)
    assert schema["properties"]["config"] == generated, \
        "values.schema.json's config schema is stale: regenerate it with nym-node config-docs --format helm-schema"
    knobs = set(yaml.safe_load(values)["config"])
    assert set(schema["properties"]["config"]["properties"]) == knobs


OPERATOR_SETS = [[], ["--set", "exampleNetwork.enabled=true", "--set", "serviceMonitor.enabled=true"],
                 ["--set", "operator.watchNamespace=mixnet"],
                 ["--set", "prometheusRule.enabled=true", "--set", "dashboards.enabled=true"]] + [
    ["-f", v] for v in sorted(glob.glob(os.path.join(OPERATOR_CHART, "ci", "*.yaml")))]


@pytest.mark.parametrize("sets", OPERATOR_SETS,
                         ids=["defaults", "example-network", "one-namespace", "monitoring"] + [
                             os.path.basename(v) for v in sorted(glob.glob(os.path.join(OPERATOR_CHART, "ci", "*.yaml")))])
def test_operator_chart_renders_only_valid_objects(sets):
    objects = render(OPERATOR_CHART, *sets)
    assert "Deployment" in {o["kind"] for o in objects}
    for o in objects:
        validate(o)
    if "exampleNetwork.enabled=true" in sets:
        nymnodes = [o for o in objects if o["kind"] == "NymNode"]
        assert sorted((n["spec"]["mode"], n["spec"].get("layer")) for n in nymnodes) == [
            ("entry-gateway", None), ("exit-gateway", None), ("mixnode", 1), ("mixnode", 2), ("mixnode", 3)]


def test_operator_chart_renders_no_key_and_lets_the_operator_make_one():
    objects = render(OPERATOR_CHART)
    assert "Secret" not in {o["kind"] for o in objects}, "the chart must render no key"
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NYM_OPERATOR_DIRECTORY_NAME"] == "release-nym-operator-directory"
    assert env["NYM_OPERATOR_OPERATOR_NAMESPACE"] == "mixnet"
    assert "NYM_OPERATOR_DIRECTORY_KEY" not in env
    assert not pod.get("volumes"), "nothing mounted: the operator reads the key through the API"
    # Its own namespace's Role: get on exactly that Secret and ConfigMap, create (which RBAC
    # cannot limit by name).
    role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith("-self"))
    assert role["metadata"]["namespace"] == "mixnet"
    secrets = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    assert {tuple(r["verbs"]) for r in secrets} == {("get",), ("create",)}
    assert next(r for r in secrets if r["verbs"] == ["get"])["resourceNames"] == ["release-nym-operator-directory"]
    # An existing Secret is used as it is, under its own name.
    objects = render(OPERATOR_CHART, "--set", "directoryKey.existingSecret=my-directory")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NYM_OPERATOR_DIRECTORY_NAME"] == "my-directory"


# --- the operator -------------------------------------------------------------------------

def test_crd_validates_and_the_chart_ships_exactly_crdgen_output():
    generated = cargo_bin("crdgen").stdout
    kubernetes_validate.validate(yaml.safe_load(generated), K8S_VERSION, strict=True)
    with open(os.path.join(OPERATOR_CHART, "crds", "nymnodes.yaml")) as f:
        assert f.read() == generated, "helm/nym-operator/crds/nymnodes.yaml differs from crdgen: regenerate it"


EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "k8s-operator", "examples", "*.yaml")))
INVALID = sorted(glob.glob(os.path.join(ROOT, "k8s-operator", "examples", "invalid", "*.yaml")))


@pytest.mark.parametrize("example", EXAMPLES, ids=os.path.basename)
def test_examples_pass_the_crd_schema_and_rules(example):
    with open(example) as f:
        for doc in docs(f.read()):
            validate_nymnode(doc)


@pytest.mark.parametrize("example", INVALID, ids=os.path.basename)
def test_invalid_examples_are_refused_with_a_clear_message(example):
    with open(example) as f:
        text = f.read()
    expect = text.splitlines()[0].removeprefix("# expect:").strip()
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_nymnode(docs(text)[0])
    assert expect in str(err.value), str(err.value)


@pytest.mark.parametrize("example", EXAMPLES, ids=os.path.basename)
def test_every_object_the_operator_builds_is_valid(example):
    objects = docs(cargo_bin("nym-operator", "render", example).stdout)
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= {o["kind"] for o in objects}
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_crd_refuses_a_storage_change_and_bounds_what_its_rules_iterate():
    storage = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["storage"]
    rule = storage["x-kubernetes-validations"][0]
    assert rule["rule"] == "self == oldSelf" and "cannot change" in rule["message"]
    env = celpy.Environment()
    program = env.program(env.compile(rule["rule"]))
    old = {"size": "1Gi"}
    assert bool(program.evaluate({"self": celpy.json_to_cel(old), "oldSelf": celpy.json_to_cel(old)}))
    assert not bool(program.evaluate({"self": celpy.json_to_cel({"size": "5Gi"}),
                                      "oldSelf": celpy.json_to_cel(old)}))
    # The env map is bounded, so the API server's estimated cost of the rules over it is too.
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["env"]["maxProperties"] <= 128
    assert spec["properties"]["env"]["additionalProperties"]["maxLength"] <= 4096
    # The topology's signer and refresh are the operator's: the upgrade depends on them.
    reserved = next(r for r in spec["x-kubernetes-validations"] if "operator owns" in r["message"])
    for var in ("NYM_NODE_TOPOLOGY_SIGNER", "NYM_NODE_TOPOLOGY_REFRESH"):
        assert f"'{var}'" in reserved["rule"]
