#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real: Prometheus/promtool,
# PostgreSQL, podman + runc + debootstrap for the image test, chromium for the report test,
# slurm-wlm + munge for the SLURM test (tests/support/slurm.py starts its own daemons),
# faketime for the lease-skew test (a driver whose wall clock is 120 s off).
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail
packages=(prometheus postgresql podman runc debootstrap uidmap slirp4netns fuse-overlayfs chromium slurm-wlm munge faketime etcd-server containerd iptables conntrack)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian package starts a system Prometheus on :9090; tests start their own.
if command -v systemctl >/dev/null 2>&1; then "${sudo_cmd[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
