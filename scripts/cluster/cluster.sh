#!/usr/bin/env bash
# A throwaway one-node Kubernetes inside the network namespace simcal-k8s: `cluster.sh up|down`.
#
# up:   builds what is missing (build.sh, images.py), then starts etcd, kube-apiserver,
#       kube-controller-manager, kube-scheduler, containerd, kubelet, kube-proxy and CoreDNS inside
#       the namespace, waits for the node to be Ready and DNS to answer, and writes .cluster/
#       (kubeconfig, values.yaml, bin/kubectl, bin/helm). Idempotent: a running cluster is kept.
# down: stops every process it started, unmounts and removes what the kubelet and containerd left,
#       restores the sysctls the kubelet changed, deletes the namespace. Idempotent.
#
# Nothing listens on or sends to an address outside the namespace except its own loopback: the
# node IP (10.200.0.2 on a veth interface), the pod bridge (cni0, 10.244.0.0/24) and the Service
# range (10.96.0.0/16) exist only inside it. The binaries and Go caches live in
# $SIMCAL_CLUSTER_CACHE (default /var/cache/simcal-cluster); the cluster's state in
# /var/lib/simcal-cluster and /run/simcal-cluster (removed by down).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${SIMCAL_CLUSTER_CACHE:-/var/cache/simcal-cluster}"
state=/var/lib/simcal-cluster
run=/run/simcal-cluster
out="$repo/.cluster"
ns=simcal-k8s
node=simcal-node
node_ip=10.200.0.2
pod_cidr=10.244.0.0/24
svc_cidr=10.96.0.0/16
dns_ip=10.96.0.10
bin="$cache/bin"
sock="$run/containerd/containerd.sock"
pki="$state/pki"
python="${PYTHON:-python3}"
# The sysctls the kubelet sets on the host (it has no namespace for these): restored by down.
sysctls=(vm.overcommit_memory kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

log() { printf '[cluster %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }
# nsenter, not `ip netns exec`: that one also remounts /sys, which hides the cgroup mounts
# from the kubelet ("failed to find cgroup mounts") and containerd.
inns() { nsenter --net="/run/netns/$ns" "$@"; }
kctl() { inns "$bin/kubectl" --kubeconfig "$state/admin.kubeconfig" "$@"; }

wait_for() {  # wait_for <seconds> <what> <command...>
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || die "timed out waiting for $what"
		sleep 1
	done
}

alive() { [[ -f "$run/pids/$1" ]] && kill -0 "$(cat "$run/pids/$1")" 2>/dev/null; }

daemon() {  # daemon <name> <command...>: started in the namespace, in a session of its own
	local name=$1
	shift
	alive "$name" && return 0
	mkdir -p "$run/pids" "$state/logs"
	setsid nsenter --net="/run/netns/$ns" "$@" >>"$state/logs/$name.log" 2>&1 </dev/null &
	echo $! >"$run/pids/$name"
}

# --- certificates and kubeconfigs -----------------------------------------------------------

cert() {  # cert <name> <subject> [subjectAltName]
	[[ -f "$pki/$1.crt" ]] && return 0
	local ext="extendedKeyUsage=serverAuth,clientAuth"$'\n'"keyUsage=critical,digitalSignature,keyEncipherment"
	[[ -n "${3:-}" ]] && ext+=$'\n'"subjectAltName=$3"
	openssl req -newkey rsa:2048 -nodes -keyout "$pki/$1.key" -out "$pki/$1.csr" -subj "$2" 2>/dev/null
	openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
		-out "$pki/$1.crt" -days 3650 -extfile <(printf '%s\n' "$ext") 2>/dev/null
}

kubeconfig() {  # kubeconfig <cert name> <file>
	cat >"$2" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: simcal-local
		  cluster:
		    server: https://$node_ip:6443
		    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
		users:
		- name: $1
		  user:
		    client-certificate-data: $(base64 -w0 "$pki/$1.crt")
		    client-key-data: $(base64 -w0 "$pki/$1.key")
		contexts:
		- name: simcal-local
		  context: {cluster: simcal-local, user: $1, namespace: default}
		current-context: simcal-local
	EOF
}

make_pki() {
	mkdir -p "$pki"
	chmod 700 "$pki"
	if [[ ! -f "$pki/ca.crt" ]]; then
		openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" \
			-days 3650 -subj "/CN=simcal-local-ca" 2>/dev/null
		openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
		openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
	fi
	cert apiserver "/CN=kube-apiserver" \
		"IP:$node_ip,IP:10.96.0.1,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
	cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
	cert admin "/O=system:masters/CN=simcal-admin"
	cert controller-manager "/CN=system:kube-controller-manager"
	cert scheduler "/CN=system:kube-scheduler"
	cert kubelet "/O=system:nodes/CN=system:node:$node" "IP:$node_ip,DNS:$node"
	cert kube-proxy "/CN=system:kube-proxy"
	cert coredns "/CN=system:coredns"
	for name in admin controller-manager scheduler kubelet kube-proxy coredns; do
		kubeconfig "$name" "$state/$name.kubeconfig"
	done
}

# --- configuration files --------------------------------------------------------------------

write_configs() {
	mkdir -p "$state/cni/net.d" "$state/cni/ipam" "$state/kubelet" "$state/pod-logs" "$run/containerd"
	cat >"$state/containerd.toml" <<-EOF
		version = 2
		root = "$cache/containerd"
		state = "$run/containerd"
		[grpc]
		  address = "$sock"
		[plugins."io.containerd.grpc.v1.cri"]
		  sandbox_image = "localhost/pause:local"
		  restrict_oom_score_adj = true
		  enable_selinux = false
		  [plugins."io.containerd.grpc.v1.cri".containerd]
		    snapshotter = "$(cat "$state/snapshotter")"
		    default_runtime_name = "runc"
		    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
		      runtime_type = "io.containerd.runc.v2"
		      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
		        SystemdCgroup = false
		        Root = "$run/runc"
		  [plugins."io.containerd.grpc.v1.cri".cni]
		    bin_dir = "$bin/cni"
		    conf_dir = "$state/cni/net.d"
	EOF
	cat >"$state/cni/net.d/10-simcal.conflist" <<-EOF
		{
		  "cniVersion": "1.0.0",
		  "name": "simcal",
		  "plugins": [
		    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
		     "ipam": {"type": "host-local", "dataDir": "$state/cni/ipam",
		              "ranges": [[{"subnet": "$pod_cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
		    {"type": "portmap", "capabilities": {"portMappings": true}}
		  ]
		}
	EOF
	cat >"$state/kubelet.yaml" <<-EOF
		apiVersion: kubelet.config.k8s.io/v1beta1
		kind: KubeletConfiguration
		# The host is on cgroup v1 and the kubelet cannot own the cgroup root here.
		failCgroupV1: false
		cgroupsPerQOS: false
		cgroupDriver: cgroupfs
		enforceNodeAllocatable: []
		containerRuntimeEndpoint: unix://$sock
		address: $node_ip
		port: 10250
		readOnlyPort: 0
		healthzBindAddress: 127.0.0.1
		healthzPort: 10248
		authentication:
		  anonymous: {enabled: false}
		  webhook: {enabled: true}
		  x509: {clientCAFile: $pki/ca.crt}
		authorization: {mode: Webhook}
		tlsCertFile: $pki/kubelet.crt
		tlsPrivateKeyFile: $pki/kubelet.key
		clusterDomain: cluster.local
		clusterDNS: [$dns_ip]
		resolvConf: ""
		podLogsDir: $state/pod-logs
		failSwapOn: false
		serializeImagePulls: false
		maxPods: 60
		evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
		imageGCHighThresholdPercent: 99
		imageGCLowThresholdPercent: 98
	EOF
	cat >"$state/kube-proxy.yaml" <<-EOF
		apiVersion: kubeproxy.config.k8s.io/v1alpha1
		kind: KubeProxyConfiguration
		clientConnection: {kubeconfig: $state/kube-proxy.kubeconfig}
		hostnameOverride: $node
		mode: iptables
		clusterCIDR: 10.244.0.0/16
		# No br_netfilter here: replies between pods on one bridge bypass iptables, so Service
		# traffic is masqueraded to go back through the gateway.
		iptables: {masqueradeAll: true}
		# Leave the host's conntrack sysctls alone.
		conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
		metricsBindAddress: 127.0.0.1:10249
		healthzBindAddress: 127.0.0.1:10256
		nodePortAddresses: [$node_ip/32]
	EOF
	cat >"$state/Corefile" <<-EOF
		cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
		    errors
		    health 127.0.0.1:18080
		    ready 127.0.0.1:18181
		    kubernetes cluster.local in-addr.arpa ip6.arpa {
		        kubeconfig $state/coredns.kubeconfig
		        pods insecure
		        fallthrough in-addr.arpa ip6.arpa
		    }
		    cache 30
		    loadbalance
		}
	EOF
}

# --- host snapshot (what down puts back) ------------------------------------------------------

snapshot_host() {
	[[ -f "$state/host.before" ]] && return 0
	{
		for key in "${sysctls[@]}"; do echo "sysctl $key $(sysctl -n "$key")"; done
		for dir in /var/lib/kubelet /var/log/pods /run/containerd; do
			[[ -e $dir ]] && echo "existed $dir"
		done
		ip netns list | awk '{print "netns " $1}'
	} >"$state/host.before.partial"
	mv "$state/host.before.partial" "$state/host.before"
}

# --- up ---------------------------------------------------------------------------------------

choose_snapshotter() {
	[[ -f "$state/snapshotter" ]] && return 0
	local probe="$state/overlay-probe"
	mkdir -p "$probe"/{l,u,w,m}
	if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
		umount "$probe/m"
		echo overlayfs >"$state/snapshotter"
	else
		echo native >"$state/snapshotter"
	fi
	rm -rf "$probe"
}

network() {
	ip netns list | grep -qw "^$ns" || ip netns add "$ns"
	inns ip link set lo up
	# The node IP on one end of a veth pair whose both ends stay in the namespace (no dummy
	# module here; the kubelet refuses a loopback node IP).
	inns ip link show simcal0 >/dev/null 2>&1 || inns ip link add simcal0 type veth peer name simcal1
	inns ip addr show dev simcal0 | grep -q "$node_ip/" || inns ip addr add "$node_ip/24" dev simcal0
	inns ip link set simcal1 up
	inns ip link set simcal0 up
	# A default route (into the dummy: nowhere) so that components that look for one find it.
	inns ip route replace default dev simcal0
}

images() {
	local key archive="$cache/images.tar"
	key="$(cd "$repo" && tar -c --sort=name --mtime=@0 --owner=0 --group=0 --exclude=__pycache__ \
		Dockerfile pyproject.toml constraints.txt README.md src scripts/cluster/images.py | sha256sum | cut -d' ' -f1)"
	if [[ ! -f "$archive" || "$(cat "$cache/images.key" 2>/dev/null)" != "$key" ]]; then
		log "building images (podman; the first build includes debootstrap)"
		nice "$python" "$here/images.py" --pause "$bin/pause" --archive "$archive" >/dev/null
		echo "$key" >"$cache/images.key"
	fi
	if [[ "$(cat "$run/images.imported" 2>/dev/null)" != "$key" ]]; then
		log "importing images into containerd"
		inns ctr --address "$sock" -n k8s.io images import --snapshotter "$(cat "$state/snapshotter")" \
			"$archive" >/dev/null
		echo "$key" >"$run/images.imported"
	fi
}

cluster_objects() {
	kctl apply -f - >/dev/null <<-EOF
		apiVersion: rbac.authorization.k8s.io/v1
		kind: ClusterRole
		metadata: {name: "system:coredns"}
		rules:
		- apiGroups: [""]
		  resources: [endpoints, services, pods, namespaces]
		  verbs: [list, watch]
		- apiGroups: [discovery.k8s.io]
		  resources: [endpointslices]
		  verbs: [list, watch]
		---
		apiVersion: rbac.authorization.k8s.io/v1
		kind: ClusterRoleBinding
		metadata: {name: "system:coredns"}
		roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
		subjects:
		- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
		---
		# The kubelet's API (logs, exec) for the API server's client certificate.
		apiVersion: rbac.authorization.k8s.io/v1
		kind: ClusterRoleBinding
		metadata: {name: "simcal:apiserver-kubelet"}
		roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kubelet-api-admin"}
		subjects:
		- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
		---
		# CoreDNS runs as a process on the node; this Service (the kubelet's clusterDNS) points at it.
		apiVersion: v1
		kind: Service
		metadata:
		  name: kube-dns
		  namespace: kube-system
		  labels: {k8s-app: kube-dns}
		spec:
		  clusterIP: $dns_ip
		  ports:
		  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
		  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
		---
		apiVersion: discovery.k8s.io/v1
		kind: EndpointSlice
		metadata:
		  name: kube-dns-node
		  namespace: kube-system
		  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: simcal-cluster}
		addressType: IPv4
		endpoints:
		- addresses: [$node_ip]
		  conditions: {ready: true}
		ports:
		- {name: dns, port: 53, protocol: UDP}
		- {name: dns-tcp, port: 53, protocol: TCP}
		---
		# The chart's PersistentVolumeClaims bind to these pre-made hostPath volumes (no provisioner).
		apiVersion: storage.k8s.io/v1
		kind: StorageClass
		metadata: {name: simcal-local}
		provisioner: kubernetes.io/no-provisioner
		volumeBindingMode: WaitForFirstConsumer
		reclaimPolicy: Retain
	EOF
	local i
	for i in 1 2 3 4 5 6; do
		mkdir -p "$state/volumes/pv$i"
		chown 1000:1000 "$state/volumes/pv$i"
		chmod 0770 "$state/volumes/pv$i"
		kctl apply -f - >/dev/null <<-EOF
			apiVersion: v1
			kind: PersistentVolume
			metadata: {name: simcal-local-pv$i}
			spec:
			  capacity: {storage: 5Gi}
			  accessModes: [ReadWriteOnce]
			  persistentVolumeReclaimPolicy: Retain
			  storageClassName: simcal-local
			  hostPath: {path: $state/volumes/pv$i, type: Directory}
			  nodeAffinity:
			    required:
			      nodeSelectorTerms:
			      - matchExpressions:
			        - {key: kubernetes.io/hostname, operator: In, values: [$node]}
		EOF
	done
}

write_out() {
	mkdir -p "$out/bin"
	cp "$state/admin.kubeconfig" "$out/kubeconfig"
	chmod 600 "$out/kubeconfig"
	cat >"$out/bin/kubectl" <<-EOF
		#!/bin/sh
		# kubectl against the local cluster, run inside its network namespace ($ns).
		exec nsenter --net=/run/netns/$ns "$bin/kubectl" --kubeconfig "$out/kubeconfig" "\$@"
	EOF
	cat >"$out/bin/helm" <<-EOF
		#!/bin/sh
		# helm against the local cluster, run inside its network namespace ($ns).
		KUBECONFIG="$out/kubeconfig" exec nsenter --net=/run/netns/$ns "$bin/helm" "\$@"
	EOF
	cat >"$out/bin/in-cluster-netns" <<-EOF
		#!/bin/sh
		# Runs a command inside the cluster's network namespace with KUBECONFIG set (simcal submit).
		KUBECONFIG="$out/kubeconfig" exec nsenter --net=/run/netns/$ns "\$@"
	EOF
	chmod +x "$out/bin/kubectl" "$out/bin/helm" "$out/bin/in-cluster-netns"
	cat >"$out/values.yaml" <<-EOF
		# Only what an install on the local cluster (make cluster) needs; see README.md.
		image:
		  repository: localhost/simcal
		  tag: local
		  pullPolicy: Never
		storage:
		  persistence:
		    storageClass: simcal-local
		# Small requests: scheduler, 8 workers, driver, operator fit a 2-CPU node.
		scheduler:
		  resources:
		    requests: {cpu: 50m, memory: 256Mi}
		    limits: {memory: 1Gi}
		workers:
		  resources:
		    requests: {cpu: 50m, memory: 192Mi}
		    limits: {cpu: "1", memory: 1Gi}
		driver:
		  resources:
		    requests: {cpu: 50m, memory: 256Mi}
		    limits: {memory: 1Gi}
		tests:
		  resources:
		    requests: {cpu: 50m, memory: 128Mi}
		    limits: {memory: 512Mi}
	EOF
	cat >"$out/operator-values.yaml" <<-EOF
		# The Dask operator's chart (shipped in the dask-kubernetes wheel) with the controller image
		# built locally from PyPI, as a user with a private registry would point it.
		image:
		  name: localhost/dask-kubernetes-operator
		  tag: local
		  pullPolicy: Never
		resources:
		  requests: {cpu: 50m, memory: 256Mi}
		  limits: {memory: 1Gi}
	EOF
}

up() {
	local t0=$SECONDS
	[[ $(id -u) -eq 0 ]] || die "make cluster needs root (network namespace, containerd, kubelet)"
	for tool in etcd containerd ctr runc iptables openssl ip; do
		command -v "$tool" >/dev/null || die "$tool is not installed (make system-deps)"
	done
	"$here/build.sh"
	mkdir -p "$state" "$run/pids" "$state/logs"
	snapshot_host
	choose_snapshotter
	network
	make_pki
	write_configs

	daemon etcd etcd --name simcal --data-dir "$state/etcd" \
		--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
		--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
		--initial-cluster simcal=http://127.0.0.1:2380
	daemon kube-apiserver "$bin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
		--advertise-address="$node_ip" --bind-address="$node_ip" --secure-port=6443 \
		--tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
		--client-ca-file="$pki/ca.crt" \
		--kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
		--kubelet-client-key="$pki/apiserver-kubelet-client.key" \
		--kubelet-preferred-address-types=InternalIP \
		--service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-cluster-ip-range="$svc_cidr" --authorization-mode=Node,RBAC \
		--enable-admission-plugins=NodeRestriction --allow-privileged=false
	wait_for 180 "the API server" kctl get --raw /readyz
	daemon kube-controller-manager "$bin/kube-controller-manager" \
		--kubeconfig="$state/controller-manager.kubeconfig" \
		--authentication-kubeconfig="$state/controller-manager.kubeconfig" \
		--authorization-kubeconfig="$state/controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
		--service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
		--cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
		--service-cluster-ip-range="$svc_cidr"
	daemon kube-scheduler "$bin/kube-scheduler" --kubeconfig="$state/scheduler.kubeconfig" \
		--authentication-kubeconfig="$state/scheduler.kubeconfig" \
		--authorization-kubeconfig="$state/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false
	daemon containerd containerd --config "$state/containerd.toml"
	wait_for 60 "containerd" inns ctr --address "$sock" version
	images
	snapshot_host
	daemon kubelet "$bin/kubelet" --config="$state/kubelet.yaml" \
		--kubeconfig="$state/kubelet.kubeconfig" --root-dir="$state/kubelet" \
		--hostname-override="$node" --node-ip="$node_ip"
	daemon kube-proxy "$bin/kube-proxy" --config="$state/kube-proxy.yaml"
	cluster_objects
	daemon coredns "$bin/coredns" -conf "$state/Corefile"
	wait_for 300 "the node to be Ready" \
		kctl wait --for=condition=Ready "node/$node" --timeout=5s
	wait_for 120 "CoreDNS" inns bash -c 'exec 3<>/dev/tcp/127.0.0.1/18181 && printf "GET /ready HTTP/1.0\r\n\r\n" >&3 && grep -q "200 OK" <&3'
	write_out
	log "cluster up in $((SECONDS - t0)) s: export PATH=$out/bin:\$PATH; kubectl get nodes"
}

# --- down -------------------------------------------------------------------------------------

stop_pid() {  # stop_pid <name>: SIGTERM to its session, then SIGKILL
	local file="$run/pids/$1" pid i
	[[ -f $file ]] || return 0
	pid=$(cat "$file")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
		for i in $(seq 1 ${2:-30}); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.5
		done
		kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$file"
}

ours() {  # the pids whose command line names our containerd socket or state (shims, leftovers)
	local p
	for p in /proc/[0-9]*; do
		tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qE "$run|$state|$cache/bin" && basename "$p"
	done
	return 0
}

down() {
	local t0=$SECONDS
	if alive containerd; then
		local ids
		# Kill the pods' containers before their shims and containerd go.
		stop_pid kubelet
		ids=$(inns ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null || true)
		for id in $ids; do inns ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
		sleep 1
		for id in $ids; do inns ctr --address "$sock" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true; done
		for id in $(inns ctr --address "$sock" -n k8s.io containers ls -q 2>/dev/null || true); do
			inns ctr --address "$sock" -n k8s.io containers delete "$id" >/dev/null 2>&1 || true
		done
	fi
	for name in coredns kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver containerd etcd; do
		stop_pid "$name"
	done
	# Shims (and anything else of ours) that outlived containerd.
	local pids
	pids=$(ours | grep -vx "$$" || true)
	[[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
	# Mounts under our directories, the kubelet's, containerd's and the pods' network namespaces.
	local before="$state/host.before" m
	for _ in 1 2 3; do
		for m in $(awk '{print $5}' /proc/self/mountinfo | grep -E "^($state|$run|$cache/containerd|/var/lib/kubelet|/run/containerd|/run/netns/cni-)" | sort -r); do
			umount -l "$m" 2>/dev/null || true
		done
	done
	for m in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^cni-' || true); do
		[[ -f $before ]] && grep -qx "netns $m" "$before" && continue
		ip netns delete "$m" 2>/dev/null || true
	done
	ip netns list 2>/dev/null | grep -qw "^$ns" && ip netns delete "$ns"
	# Cgroup folders of the pods' containers (cgroupfs driver, no QOS tree).
	local cg
	for cg in /sys/fs/cgroup/*/k8s.io /sys/fs/cgroup/*/kubepods* /sys/fs/cgroup/*/pod[0-9a-f]*-*; do
		[[ -d $cg ]] || continue
		find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done
	if [[ -f $before ]]; then
		while read -r kind key value; do
			[[ $kind == sysctl ]] && sysctl -q -w "$key=$value" >/dev/null || true
		done <"$before"
		for dir in /var/lib/kubelet /var/log/pods /run/containerd; do
			grep -qx "existed $dir" "$before" || rm -rf "$dir"
		done
	fi
	rm -rf "$state" "$run" "$out"
	log "cluster down in $((SECONDS - t0)) s"
}

# Sourced (for a step by step start): only the functions.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0
case "${1:-}" in
up) up ;;
down) down ;;
*) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
