"""What the manifest checks share: paths, running tools, rendering charts, the workspace's
built binaries."""

import json
import os
import subprocess

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.environ.get("NYM_TOOLS_DIR", os.path.expanduser("~/.cache/nym-node-tools"))
K8S_VERSION = "1.37.0"
NODE_CHART = os.path.join(ROOT, "helm", "nym-node")
OPERATOR_CHART = os.path.join(ROOT, "helm", "nym-operator")
ENV = dict(os.environ, PATH=os.path.join(TOOLS, "bin") + os.pathsep + os.environ["PATH"])


def run(*cmd, check=True, **kwargs):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=check, **kwargs)


_BUILT = None


def built_binaries():
    """Where `cargo test` left the workspace's binaries, brought up to date once per session.

    `cargo test --no-run` builds them with the test run's features, which is free after
    scripts/test.sh's `cargo test`; `cargo run -p` would resolve features per package and
    rebuild much of the dependency tree a second time.
    """
    global _BUILT
    if _BUILT is None:
        build = run("cargo", "test", "--workspace", "--locked", "--no-run", check=False)
        assert build.returncode == 0, build.stderr
        meta = json.loads(run("cargo", "metadata", "--format-version", "1", "--no-deps").stdout)
        _BUILT = os.path.join(meta["target_directory"], "debug")
    return _BUILT


def cargo_bin(binary, *args):
    out = run(os.path.join(built_binaries(), binary), *args, check=False)
    assert out.returncode == 0, f"{binary} {' '.join(args)} failed:\n{out.stderr}"
    return out


def docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def render_text(chart, *args, release="release", namespace="mixnet"):
    return run("helm", "template", release, chart, "--namespace", namespace, *args).stdout


def render(chart, *args, release="release", namespace="mixnet"):
    return docs(render_text(chart, *args, release=release, namespace=namespace))


def pod_specs(objects):
    """(where, pod spec) of every pod an object list would run."""
    out = []
    for o in objects:
        kind, name = o["kind"], o["metadata"]["name"]
        if kind == "Pod":
            out.append((f"Pod/{name}", o["spec"]))
        elif kind in ("StatefulSet", "Deployment", "DaemonSet", "ReplicaSet", "Job"):
            out.append((f"{kind}/{name}", o["spec"]["template"]["spec"]))
    return out
