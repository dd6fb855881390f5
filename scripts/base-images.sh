#!/usr/bin/env bash
# Creates the public base images the Dockerfile names (debian:bookworm-slim, rust:1-bookworm)
# locally, when they are absent: for machines that cannot pull from a registry. Anyone with
# registry access never needs this; `docker build .` pulls the real ones.
#
#   debian:bookworm-slim  a minimal Debian bookworm made with debootstrap, slimmed, docker-imported
#   rust:1-bookworm       that Debian plus gcc and this machine's stable Rust toolchain (a
#                         stand-in for the official image: same tag, same PATH layout)
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
have() { docker image inspect "$1" >/dev/null 2>&1; }

debian_mirror() {
  # The mirror this machine's apt already uses (a deb822 or one-line source), else Debian's.
  local m
  m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/debian.sources | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$m" ] || m=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

if ! have debian:bookworm-slim; then
  echo "base-images: creating debian:bookworm-slim with debootstrap"
  command -v debootstrap >/dev/null || {
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  root=$(mktemp -d)
  trap '$SUDO rm -rf "$root"' EXIT
  $SUDO debootstrap --variant=minbase bookworm "$root" "$(debian_mirror)" >/dev/null
  $SUDO rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
  $SUDO find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
  $SUDO tar -C "$root" -c . | docker import -c 'CMD ["bash"]' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - debian:bookworm-slim >/dev/null
  $SUDO rm -rf "$root"
  trap - EXIT
fi

if ! have rust:1-bookworm; then
  echo "base-images: creating rust:1-bookworm from this machine's toolchain"
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  sysroot=$(rustc --print sysroot)
  # Hard links keep the copy cheap; the docs are not needed to build.
  cp -al "$sysroot" "$ctx/rust" 2>/dev/null || cp -a "$sysroot" "$ctx/rust"
  rm -rf "$ctx/rust/share/doc"
  # Only this stand-in trusts the machine's CA bundle (some networks re-sign TLS); the image
  # users get never contains it.
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca.crt"
  cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc libc6-dev ca-certificates pkg-config git \
 && rm -rf /var/lib/apt/lists/*
COPY host-ca.crt /usr/local/share/ca-certificates/host-ca.crt
RUN update-ca-certificates >/dev/null
COPY rust /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DOCKERFILE
  docker build --force-rm -q -t rust:1-bookworm "$ctx" >/dev/null
  rm -rf "$ctx"
  trap - EXIT
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(debian:bookworm-slim|rust:1-bookworm) '
