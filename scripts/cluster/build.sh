#!/usr/bin/env bash
# Builds the binaries of the throwaway local cluster into $SIMCAL_CLUSTER_CACHE/bin (once).
#
# Kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl),
# helm, the CNI plugins and CoreDNS, each from its Go module at the version pinned in
# scripts/cluster/build/<name>/go.mod. Go module and build caches live in the cache, outside the
# checkout. A binary already present for the pinned go.sum is not rebuilt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${SIMCAL_CLUSTER_CACHE:-/var/cache/simcal-cluster}"
mkdir -p "$cache/bin" "$cache/gomod" "$cache/gocache" "$cache/gopath"
export GOMODCACHE="$cache/gomod" GOCACHE="$cache/gocache" GOPATH="$cache/gopath"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

build() {  # build <module dir> <output name> <package> [-X flags]
	local dir="$here/build/$1" out="$cache/bin/$2" pkg="$3" xflags="${4:-}"
	local stamp="$out.sum"
	local want
	want="$( (cat "$dir"/go.* "$dir"/*.go; echo "$xflags") | sha256sum | cut -d' ' -f1)"
	if [[ -x "$out" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
		return 0
	fi
	local t0=$SECONDS
	(cd "$dir" && nice -n 10 go build -trimpath -ldflags "-s -w $xflags" -o "$out.tmp" "$pkg")
	mv "$out.tmp" "$out"
	echo "$want" >"$stamp"
	echo "built $2 in $((SECONDS - t0)) s"
}

t0=$SECONDS
# The release in go.mod, stamped into the binaries as `make release` does (else they report
# v0.0.0-master, and charts with a kubeVersion constraint refuse to install).
k8s="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/build/kubernetes/go.mod")"
minor="${k8s#v1.}"
minor="${minor%%.*}"
xflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	xflags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
	xflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
# Two lanes, one per core: the Kubernetes servers (they share most packages, so one after
# another, each reusing what the last compiled) beside kubectl, helm, the CNI plugins and
# CoreDNS. One lane after the other left a core idle for most of a cold build (user time
# about equal to wall time, 881 s): while one go build links or downloads modules, the
# other compiles. Two lanes, cold, module downloads included: 611 s (user 970 s), 2026-12-07.
servers() {
	for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
		build kubernetes "$cmd" "k8s.io/kubernetes/cmd/$cmd" "$xflags"
	done
}
tools() {
	build kubernetes kubectl k8s.io/kubernetes/cmd/kubectl "$xflags"
	[[ -d "$here/build/helm" ]] && build helm helm helm.sh/helm/v4/cmd/helm
	if [[ -d "$here/build/cni" ]]; then
		for p in bridge host-local loopback portmap; do
			case $p in
			bridge) pkg=github.com/containernetworking/plugins/plugins/main/bridge ;;
			loopback) pkg=github.com/containernetworking/plugins/plugins/main/loopback ;;
			host-local) pkg=github.com/containernetworking/plugins/plugins/ipam/host-local ;;
			portmap) pkg=github.com/containernetworking/plugins/plugins/meta/portmap ;;
			esac
			build cni "cni/$p" "$pkg"
		done
	fi
	[[ -d "$here/build/coredns" ]] && build coredns coredns .
	build pause pause .
}
# Each lane is a subshell of its own, where `set -e` stops it at its first failed build.
servers &
lanes=($!)
tools &
lanes+=($!)
failed=0
for lane in "${lanes[@]}"; do
	wait "$lane" || failed=1
done
if ((failed)); then
	echo "cluster build failed (see the go build output above)" >&2
	exit 1
fi
echo "cluster build done in $((SECONDS - t0)) s (cache $cache)"
