#!/usr/bin/env bash
# A single-node Kubernetes cluster on this machine, on 127.0.0.1 alone, for
# wasm-csi's end-to-end suite (test/e2e, `make e2e`).
#
#   test/e2e/cluster.sh up      clean up any earlier run, install, build, start; wait for the node
#   test/e2e/cluster.sh down    stop everything, unmount, undo every change to the host
#   test/e2e/cluster.sh status  what is running
#   test/e2e/cluster.sh logs    the node's logs a person needs after a failure
#   test/e2e/cluster.sh env     KUBECONFIG=... for a shell
#
# WASM_CSI_E2E_DRIVER_BIN=PATH puts that driver binary in the image instead of
# `make build`'s bin/wasm-csi-driver (a release build, a candidate fix).
#
# Run as root. What it uses:
# - Debian packages: containernetworking-plugins (bridge, host-local,
#   loopback in /usr/lib/cni), libseccomp-dev and gcc (to build runc),
#   etcd-server (through test/kube/build.sh).
# - Built from the Go module proxy into bin/ and cached there:
#   kube-apiserver, kubectl, kubelet, kube-controller-manager, kube-scheduler
#   (test/kube/build.sh); containerd v2.4.2 and runc v1.5.2 (`go install`).
# - Images assembled from static Go binaries by cmd/mkimage and
#   imported with `ctr -n k8s.io images import`: the pause image
#   (test/tools/pause), the driver (bin/wasm-csi-driver) and the test
#   gateway (test/tools/gateway). Nothing is pulled from a registry.
#
# The runtime reads registry hosts from $STATE/containerd/certs.d/<host>/hosts.toml
# (none by default; test/clusterbench writes one for its registry).
#
# Everything listens on 127.0.0.1: etcd :12379/:12380, kube-apiserver :16443,
# kubelet :10250 (healthz :10248), containerd on a unix socket in
# /run/wasm-csi-e2e. Controller-manager and scheduler serve nothing
# (--secure-port=0). Pods get addresses from a bridge (wcsie2e0) on
# 10.97.0.0/24; nothing is masqueraded or forwarded off the machine.
#
# The host changes it makes, and `down` undoes: /var/lib/kubelet (kubelet's
# root: the driver's manifests assume it) and /var/lib/wasm-csi (the
# driver's store), /var/log/pods and /var/log/containers, when they did not
# exist before; a "127.0.0.1 <node>" line in /etc/hosts (kubectl logs/exec
# reach kubelet by the node's name); the sysctls kubelet sets
# (kernel.panic, kernel.panic_on_oops, vm.overcommit_memory, ...) and the
# bridge plugin sets (net.ipv4.ip_forward), saved before and put back after;
# the bridge interface; iptables chains kubelet or the CNI plugins add
# (KUBE-*, CNI-*); kubelet's cgroups (kubepods). State lives in
# /var/lib/wasm-csi-e2e and /run/wasm-csi-e2e; `down` removes both and copies
# the logs to /tmp/wasm-csi-e2e-logs first. `up` after a crashed run runs
# `down` first. Processes are stopped by the ids recorded when they were
# started, never by name.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$here/../.." && pwd)
BIN=${WASM_CSI_BIN_DIR:-$ROOT/bin}
GO=${GO:-go}
STATE=${WASM_CSI_E2E_STATE:-/var/lib/wasm-csi-e2e}
RUN=/run/wasm-csi-e2e
LOGS=$STATE/logs
KEEP_LOGS=${WASM_CSI_E2E_LOGS:-/tmp/wasm-csi-e2e-logs}
NODE=${WASM_CSI_E2E_NODE:-wasm-csi-e2e}
KUBELET_DIR=/var/lib/kubelet
STORE_DIR=/var/lib/wasm-csi
BRIDGE=wcsie2e0
POD_CIDR=10.97.0.0/24
SERVICE_CIDR=10.96.23.0/24
SERVICE_IP=10.96.23.1
APISERVER_PORT=16443 # also in test/e2e/overlay/daemonset.yaml
ETCD_PORT=12379
ETCD_PEER_PORT=12380
SOCK=$RUN/containerd.sock
CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.2
IMAGE_PREFIX=e2e.wasm-csi.local # also in test/e2e/overlay and the suite
PAUSE_IMAGE=$IMAGE_PREFIX/pause:e2e
DRIVER_IMAGE=$IMAGE_PREFIX/wasm-csi-driver:e2e
GATEWAY_IMAGE=$IMAGE_PREFIX/gateway:e2e
HOSTS_MARK="# wasm-csi-e2e (test/e2e/cluster.sh)"
# Sysctls kubelet (setupKernelTunables) and the bridge plugin may change.
SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
	kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward
	net.ipv6.conf.all.forwarding net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)
# Paths created here when missing, removed by down when this script made them.
CREATED_CANDIDATES=("$KUBELET_DIR" "$STORE_DIR" /var/log/pods /var/log/containers /run/containerd /run/netns /var/lib/cni)
# Components in start order; down stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet)

log() { echo "e2e-cluster: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}
kubectl_() { "$BIN/kubectl" --kubeconfig "$STATE/pki/admin.kubeconfig" "$@"; }
ctr_() { "$BIN/ctr" --address "$SOCK" -n k8s.io "$@"; }

require_root() { [ "$(id -u)" -eq 0 ] || die "run as root: it starts kubelet and containerd and mounts"; }

# --- processes ------------------------------------------------------------------

# start NAME BINARY ARGS...: runs a daemon in its own session with its output in
# $LOGS/NAME.log, and records its pid and binary in $RUN/NAME.pid.
start() {
	local name=$1 bin=$2
	shift 2
	echo "+ $bin $*" >>"$LOGS/$name.log"
	# In a non-interactive shell the subshell is not a process group leader,
	# so setsid does not fork: $! is the daemon's pid.
	(exec setsid "$bin" "$@" </dev/null >>"$LOGS/$name.log" 2>&1) &
	local pid=$!
	echo "$pid $bin" >"$RUN/$name.pid"
	log "started $name (pid $pid)"
}

# ours PID BINARY: the process is alive and runs BINARY (a pid is not reused
# for someone else's process).
ours() {
	local pid=$1 bin=$2 exe
	[ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
	exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
	[ "${exe% (deleted)}" = "$bin" ]
}

alive() {
	local f=$RUN/$1.pid pid bin
	[ -f "$f" ] || return 1
	read -r pid bin <"$f"
	ours "$pid" "$bin"
}

# stop NAME [GRACE]: SIGTERM, then SIGKILL after GRACE seconds.
stop() {
	local name=$1 grace=${2:-15} f=$RUN/$1.pid pid bin i
	[ -f "$f" ] || return 0
	read -r pid bin <"$f"
	if ours "$pid" "$bin"; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < grace * 10; i++)); do
			ours "$pid" "$bin" || break
			sleep 0.1
		done
		if ours "$pid" "$bin"; then
			log "$name (pid $pid) did not stop in ${grace}s: SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			for ((i = 0; i < 50; i++)); do
				ours "$pid" "$bin" || break
				sleep 0.1
			done
		fi
		log "stopped $name (pid $pid)"
	fi
	rm -f "$f"
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
wait_for() {
	local secs=$1 what=$2 i
	shift 2
	for ((i = 0; i < secs * 2; i++)); do
		if "$@" >/dev/null 2>&1; then
			return 0
		fi
		sleep 0.5
	done
	log "$what did not come up in ${secs}s"
	return 1
}

# --- install and build ------------------------------------------------------------

install_packages() {
	local want=(containernetworking-plugins libseccomp-dev gcc iproute2 mount util-linux curl nftables) missing=() p
	for p in "${want[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		log "apt-get install ${missing[*]}"
		export DEBIAN_FRONTEND=noninteractive
		if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$LOGS/apt.log" 2>&1; then
			log "apt-get install failed; apt-get update and retry"
			apt-get update -q >>"$LOGS/apt.log" 2>&1
			apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOGS/apt.log" 2>&1 || {
				cat "$LOGS/apt.log" >&2
				die "apt-get install ${missing[*]} failed"
			}
		fi
	fi
	[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] ||
		die "/usr/lib/cni lacks bridge, host-local or loopback (containernetworking-plugins)"
}

# Containerd and runc from the Go module proxy, cached in bin/ by version:
# Debian's containerd 1.6 lacks the RuntimeConfig CRI call kubelet 1.36
# asks for (and 1.37 will need).
build_runtime() {
	if ! "$BIN/containerd" --version 2>/dev/null | grep -q " ${CONTAINERD_VERSION#v}[+ ]" ||
		! "$BIN/containerd-shim-runc-v2" -v 2>/dev/null | grep -q "Version: *${CONTAINERD_VERSION#v}" ||
		! [ -x "$BIN/ctr" ]; then
		log "building containerd $CONTAINERD_VERSION into $BIN"
		GOBIN=$BIN CGO_ENABLED=0 "$GO" install -trimpath -tags no_btrfs \
			"github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
			"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
			"github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
	fi
	if ! "$BIN/runc" --version 2>/dev/null | grep -q "^runc version ${RUNC_VERSION#v}$"; then
		log "building runc $RUNC_VERSION into $BIN"
		GOBIN=$BIN CGO_ENABLED=1 "$GO" install -trimpath -tags seccomp "github.com/opencontainers/runc@$RUNC_VERSION"
	fi
}

gateway_pkg() {
	if [ -n "${WASM_CSI_E2E_GATEWAY_PKG:-}" ]; then
		echo "$WASM_CSI_E2E_GATEWAY_PKG"
	elif [ -d "$ROOT/test/tools/gateway" ]; then
		echo ./test/tools/gateway
	else
		die "test/tools/gateway does not exist (set WASM_CSI_E2E_GATEWAY_PKG to another package)"
	fi
}

build_all() {
	local start=$SECONDS
	test/kube/build.sh "$BIN" kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler >&2
	build_runtime
	log "building the driver, the pause and gateway programs and the image tool"
	local driver=${WASM_CSI_E2E_DRIVER_BIN:-}
	if [ -z "$driver" ]; then
		make -s -C "$ROOT" build >&2
		driver=$BIN/wasm-csi-driver
	fi
	mkdir -p "$STATE/bin" "$STATE/images"
	CGO_ENABLED=0 "$GO" build -trimpath -o "$STATE/bin/" ./test/tools/pause ./test/tools/pki ./cmd/mkimage
	CGO_ENABLED=0 "$GO" build -trimpath -o "$STATE/bin/gateway" "$(gateway_pkg)"
	"$STATE/bin/mkimage" -o "$STATE/images/pause.tar" -name "$PAUSE_IMAGE" -entrypoint /pause "$STATE/bin/pause=/pause" >&2
	"$STATE/bin/mkimage" -o "$STATE/images/driver.tar" -name "$DRIVER_IMAGE" -entrypoint /wasm-csi-driver "$driver=/wasm-csi-driver" >&2
	"$STATE/bin/mkimage" -o "$STATE/images/gateway.tar" -name "$GATEWAY_IMAGE" -entrypoint /gateway "$STATE/bin/gateway=/gateway" >&2
	log "builds done in $((SECONDS - start))s"
}

# --- host changes, recorded so that down can undo them -----------------------------

record_host() {
	local p k v t
	: >"$STATE/created"
	for p in "${CREATED_CANDIDATES[@]}"; do
		[ -e "$p" ] || echo "$p" >>"$STATE/created"
	done
	: >"$STATE/sysctl.saved"
	for k in "${SYSCTLS[@]}"; do
		if v=$(sysctl -n "$k" 2>/dev/null); then
			echo "$k=$v" >>"$STATE/sysctl.saved"
		fi
	done
	for t in filter nat mangle; do
		if command -v iptables >/dev/null; then iptables -t "$t" -S 2>/dev/null | awk '$1 == "-N" {print $2}' >"$STATE/iptables.$t.before" || true; fi
		if command -v ip6tables >/dev/null; then ip6tables -t "$t" -S 2>/dev/null | awk '$1 == "-N" {print $2}' >"$STATE/ip6tables.$t.before" || true; fi
	done
	if command -v nft >/dev/null; then nft list tables 2>/dev/null >"$STATE/nft.tables.before" || true; fi
	if ! awk -v n="$NODE" '$1 !~ /^#/ { for (i = 2; i <= NF; i++) if ($i == n && $1 == "127.0.0.1") f = 1 } END { exit !f }' /etc/hosts; then
		# Write in place (not a rename): /etc/hosts may be a bind mount.
		echo "127.0.0.1 $NODE $HOSTS_MARK" >>/etc/hosts
		log "added '127.0.0.1 $NODE' to /etc/hosts"
	fi
}

# nft_table_empty FAMILY TABLE: the table holds no rules (only chain heads).
nft_table_empty() {
	nft list table "$1" "$2" 2>/dev/null | awk '
		/^[ \t]*(table|chain) .*\{$/ || /^[ \t]*type .* hook / || /^[ \t]*\}$/ || /^[ \t]*$/ { next }
		{ found = 1 }
		END { exit found }'
}

restore_host() {
	local line k v t c tool
	if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
		local tmp
		tmp=$(mktemp)
		grep -vF "$HOSTS_MARK" /etc/hosts >"$tmp" || true
		cat "$tmp" >/etc/hosts
		rm -f "$tmp"
		log "removed the /etc/hosts line"
	fi
	if [ -f "$STATE/sysctl.saved" ]; then
		while IFS= read -r line; do
			k=${line%%=*}
			v=${line#*=}
			if [ "$(sysctl -n "$k" 2>/dev/null)" != "$v" ]; then
				sysctl -q -w "$k=$v" >/dev/null && log "restored $k=$v"
			fi
		done <"$STATE/sysctl.saved"
		rm -f "$STATE/sysctl.saved"
	fi
	for tool in iptables ip6tables; do
		command -v $tool >/dev/null || continue
		for t in filter nat mangle; do
			[ -f "$STATE/$tool.$t.before" ] || continue
			# Chains kubelet or the CNI plugins made: drop the rules that jump
			# to them, then flush and delete them.
			for c in $($tool -t $t -S 2>/dev/null | awk '$1 == "-N" {print $2}' | grep -E '^(KUBE-|CNI-)' | grep -vxF -f "$STATE/$tool.$t.before" || true); do
				{ $tool -t $t -S 2>/dev/null | grep -E -- "-j $c( |\$)" || true; } | sed 's/^-A /-D /' | while read -r rule; do
					eval "$tool -t $t $rule" 2>/dev/null || true
				done
				$tool -t $t -F "$c" 2>/dev/null || true
			done
			for c in $($tool -t $t -S 2>/dev/null | awk '$1 == "-N" {print $2}' | grep -E '^(KUBE-|CNI-)' | grep -vxF -f "$STATE/$tool.$t.before" || true); do
				$tool -t $t -X "$c" 2>/dev/null && log "removed $tool $t chain $c"
			done
			rm -f "$STATE/$tool.$t.before"
		done
	done
	# Tables that iptables-nft made for those chains, now empty.
	if [ -f "$STATE/nft.tables.before" ] && command -v nft >/dev/null; then
		nft list tables 2>/dev/null | grep -vxF -f "$STATE/nft.tables.before" | while read -r _ family table; do
			nft_table_empty "$family" "$table" && nft delete table "$family" "$table" 2>/dev/null &&
				log "removed the empty nftables table $family $table (iptables-nft made it)"
		done || true
		rm -f "$STATE/nft.tables.before"
	fi
}

# --- configuration ----------------------------------------------------------------------

write_configs() {
	mkdir -p "$STATE/pki" "$STATE/cni/net.d" "$STATE/cni/ipam" "$STATE/kubelet" "$STATE/containerd/certs.d"
	"$STATE/bin/pki" -dir "$STATE/pki" -node "$NODE" -server "https://127.0.0.1:$APISERVER_PORT" -service-ip "$SERVICE_IP"

	# No ipMasq and no portmap: pods talk to the host and each other only,
	# so the plugins add no iptables rules.
	cat >"$STATE/cni/net.d/10-wasm-csi-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "wasm-csi-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "loopback"}
  ]
}
EOF

	cat >"$STATE/containerd/config.toml" <<EOF
version = 3
root = "$STATE/containerd/root"
state = "$RUN/containerd"
# Nothing from /etc/containerd; no /opt/containerd, no NRI socket in /var/run/nri.
imports = []
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri"]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  address = "$RUN/containerd-debug.sock"
  level = "info"

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    # Registries the runtime pulls from are configured by a hosts.toml per
    # host here (the cluster benchmark, test/clusterbench, writes one for
    # its local plain-HTTP registry). Empty otherwise.
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = "$STATE/containerd/certs.d"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "$PAUSE_IMAGE"

  [plugins.'io.containerd.cri.v1.runtime']
    # No CAP_SYS_RESOURCE in the bounding set on these machines.
    restrict_oom_score_adj = true
    # Pod network namespaces under $RUN, not /run/netns.
    netns_mounts_under_state_dir = true
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "$BIN/runc"
          Root = "$RUN/runc"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["/usr/lib/cni"]
      conf_dir = "$STATE/cni/net.d"
      max_conf_num = 1

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
EOF

	cat >"$STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $STATE/pki/kubelet.crt
tlsPrivateKeyFile: $STATE/pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$SOCK
# These machines run cgroup v1 and have no systemd cgroup driver to use.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
# ConfigMap volumes (the driver's config) are refreshed on each pod sync:
# every 10s instead of every minute.
syncFrequency: 10s
# Never evict or garbage-collect on a full workstation disk: the images
# cannot be pulled back.
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 40
serializeImagePulls: false
# No KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY / KUBE-FIREWALL chains: they
# exist for kube-proxy, which this cluster does not run.
makeIPTablesUtilChains: false
resolvConf: /etc/resolv.conf
EOF
}

# --- up -------------------------------------------------------------------------------------

port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

preflight() {
	local p
	for p in "$KUBELET_DIR" "$STORE_DIR"; do
		[ ! -e "$p" ] || die "$p exists and is not from an earlier run of this script: is another kubelet or wasm-csi installed here? Not touching it."
	done
	for p in $ETCD_PORT $ETCD_PEER_PORT $APISERVER_PORT 10250 10248 9809; do
		port_free "$p" || die "port $p is in use on this machine: $(ss -Hltnp "sport = :$p" | head -n1)"
	done
	ip link show "$BRIDGE" >/dev/null 2>&1 && die "interface $BRIDGE exists but no run is recorded"
	grep -qs '^cgroup2 /sys/fs/cgroup ' /proc/mounts && log "note: cgroup v2 host; the kubelet config assumes v1 but works on v2"
	true
}

node_ready() {
	[ "$(kubectl_ get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

cmd_up() {
	require_root
	local t0=$SECONDS
	if [ -e "$STATE" ] || [ -e "$RUN" ]; then
		log "state of an earlier run found: cleaning it up first"
		cmd_down
		set -e
	fi
	preflight
	mkdir -p "$STATE" "$LOGS" "$RUN"
	cd "$ROOT"
	export PATH="$BIN:$PATH" # containerd finds containerd-shim-runc-v2 on PATH
	install_packages
	build_all

	record_host
	write_configs
	mkdir -p "$KUBELET_DIR"

	local pki=$STATE/pki
	start etcd /usr/bin/etcd --name=e2e --data-dir="$STATE/etcd" \
		--listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster="e2e=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state=new \
		--quota-backend-bytes=$((512 << 20)) --logger=zap --log-level=warn
	wait_for 30 etcd curl -fsS "http://127.0.0.1:$ETCD_PORT/health" || die "etcd did not start; see $LOGS/etcd.log"

	start kube-apiserver "$BIN/kube-apiserver" \
		--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
		--tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" --cert-dir="$pki" \
		--etcd-servers="http://127.0.0.1:$ETCD_PORT" --client-ca-file="$pki/ca.crt" \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
		--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=true \
		--service-cluster-ip-range="$SERVICE_CIDR" \
		--kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
		--kubelet-certificate-authority="$pki/ca.crt" --kubelet-preferred-address-types=Hostname \
		--endpoint-reconciler-type=none --profiling=false --event-ttl=1h
	wait_for 90 kube-apiserver kubectl_ get --raw /readyz || die "kube-apiserver did not become ready; see $LOGS/kube-apiserver.log"

	start kube-controller-manager "$BIN/kube-controller-manager" \
		--kubeconfig="$pki/controller-manager.kubeconfig" --bind-address=127.0.0.1 --secure-port=0 \
		--root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
		--use-service-account-credentials=true --leader-elect=false --profiling=false
	start kube-scheduler "$BIN/kube-scheduler" \
		--kubeconfig="$pki/scheduler.kubeconfig" --bind-address=127.0.0.1 --secure-port=0 \
		--leader-elect=false --profiling=false

	start containerd "$BIN/containerd" --config "$STATE/containerd/config.toml"
	wait_for 30 containerd "$BIN/ctr" --address "$SOCK" version || die "containerd did not start; see $LOGS/containerd.log"
	local img
	for img in pause driver gateway; do
		ctr_ images import --platform linux/amd64 "$STATE/images/$img.tar" >>"$LOGS/ctr-import.log" 2>&1 ||
			die "ctr images import $img.tar failed: $(tail -n 5 "$LOGS/ctr-import.log")"
	done

	start kubelet "$BIN/kubelet" --config="$STATE/kubelet/config.yaml" \
		--kubeconfig="$pki/kubelet.kubeconfig" --hostname-override="$NODE" --root-dir="$KUBELET_DIR" --v=2
	wait_for 120 "node $NODE Ready" node_ready || die "node $NODE is not Ready; see $LOGS/kubelet.log"
	# The default ServiceAccount exists once the controller-manager has run.
	wait_for 60 "serviceaccount default/default" kubectl_ -n default get serviceaccount default ||
		die "the controller-manager made no default ServiceAccount; see $LOGS/kube-controller-manager.log"
	log "images imported: $(ctr_ images ls -q 2>/dev/null | grep -F "$IMAGE_PREFIX/" | tr '\n' ' ')"
	log "cluster up in $((SECONDS - t0))s: export KUBECONFIG=$STATE/pki/admin.kubeconfig (kubectl: $BIN/kubectl)"
}

# --- down -----------------------------------------------------------------------------------

# Delete workloads through the API while kubelet and the driver still run, so
# kubelet unpublishes every volume and tears down pod networks as it would.
no_pods_but_driver() { [ -z "$(kubectl_ get pods -A -o jsonpath='{.items[?(@.metadata.namespace!="wasm-csi")].metadata.name}' 2>/dev/null)" ]; }
no_pods() { [ -z "$(kubectl_ get pods -A -o name 2>/dev/null)" ]; }

drain_through_api() {
	alive kube-apiserver && alive kubelet || return 0
	log "deleting workloads through the API"
	kubectl_ delete deployments,replicasets,statefulsets,jobs --all --all-namespaces --wait=false >/dev/null 2>&1 || true
	local ns
	for ns in $(kubectl_ get ns -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
		[ "$ns" = wasm-csi ] && continue
		kubectl_ -n "$ns" delete pods --all --grace-period=1 --wait=false >/dev/null 2>&1 || true
	done
	wait_for 90 "deletion of the pods" no_pods_but_driver || true
	# Then the driver: every volume is unpublished by now.
	kubectl_ delete daemonsets --all --all-namespaces --wait=false >/dev/null 2>&1 || true
	kubectl_ -n wasm-csi delete pods --all --grace-period=5 --wait=false >/dev/null 2>&1 || true
	wait_for 60 "deletion of the driver pods" no_pods || true
}

# Whatever containers remain (kubelet gone, a crash): kill and delete them
# through containerd.
remove_containers() {
	alive containerd || return 0
	local id
	for id in $(ctr_ tasks ls -q 2>/dev/null); do
		ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
	done
	sleep 1
	for id in $(ctr_ tasks ls -q 2>/dev/null); do
		ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true
	done
	for id in $(ctr_ containers ls -q 2>/dev/null); do
		ctr_ containers delete "$id" >/dev/null 2>&1 || true
	done
}

# Container processes and shims left behind (containerd died, or was killed):
# the processes in kubelet's cgroups (kubepods), and the shims of this
# containerd (our shim binary, serving our socket).
kill_leftovers() {
	local h pid pids i
	[ -d "$RUN" ] || return 0
	for ((i = 0; i < 10; i++)); do
		pids=$(for h in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
			if [ -d "$h" ]; then find "$h" -name cgroup.procs -exec cat {} + 2>/dev/null; fi
		done | sort -un || true)
		[ -n "$pids" ] || break
		for pid in $pids; do
			local what
			what=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-60)
			kill -KILL "$pid" 2>/dev/null && log "killed leftover container process $pid ($what)"
		done
		sleep 0.5
	done
	for pid in $(ls /proc | grep -E '^[0-9]+$'); do
		ours "$pid" "$BIN/containerd-shim-runc-v2" || continue
		tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$SOCK" || continue
		kill -KILL "$pid" 2>/dev/null && log "killed leftover shim $pid"
	done
	true
}

mounts_under() {
	# Mount points at or below any of the given paths, deepest first.
	awk '{print $2}' /proc/mounts | while IFS= read -r m; do
		m=$(printf '%b' "$m") # \040 and friends
		for p in "$@"; do
			case $m in "$p" | "$p"/*) echo "$m" ;; esac
		done
	done | awk '{print length($0) " " $0}' | sort -rn -k1,1 | cut -d' ' -f2- | uniq
}

unmount_all() {
	local m pass
	for pass in 1 2 3; do
		local left=0
		while IFS= read -r m; do
			[ -n "$m" ] || continue
			left=1
			umount "$m" 2>/dev/null || { [ $pass -eq 3 ] && umount -l "$m" 2>/dev/null; } || true
		done < <(mounts_under "$KUBELET_DIR" "$STORE_DIR" "$STATE" "$RUN")
		[ $left -eq 1 ] || break
	done
	if [ -n "$(mounts_under "$KUBELET_DIR" "$STORE_DIR" "$STATE" "$RUN")" ]; then
		log "warning: still mounted:"
		mounts_under "$KUBELET_DIR" "$STORE_DIR" "$STATE" "$RUN" >&2
	fi
}

remove_network() {
	local l
	if ip link show "$BRIDGE" >/dev/null 2>&1; then
		for l in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
			ip link delete "$l" 2>/dev/null || true
		done
		ip link delete "$BRIDGE" && log "removed interface $BRIDGE"
	fi
}

remove_cgroups() {
	local h d
	grep -qxF "$KUBELET_DIR" "$STATE/created" 2>/dev/null || return 0
	for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
		[ -d "${h}kubepods" ] || continue
		find "${h}kubepods" -depth -type d 2>/dev/null | while IFS= read -r d; do rmdir "$d" 2>/dev/null || true; done
		[ -d "${h}kubepods" ] && log "warning: ${h}kubepods is still there (processes left in it?)"
	done
	true
}

cmd_down() {
	require_root
	# Best effort: every step runs whatever the one before did.
	set +e
	[ -e "$STATE" ] || [ -e "$RUN" ] || {
		log "nothing to tear down"
		return 0
	}
	mkdir -p "$RUN"
	drain_through_api || true
	stop kubelet 20
	remove_containers || true
	stop containerd 15
	kill_leftovers
	local c
	for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do
		stop "$c" 15
	done
	unmount_all
	remove_network
	remove_cgroups
	restore_host
	if [ -f "$STATE/created" ]; then
		while IFS= read -r p; do
			[ -n "$p" ] && [ -e "$p" ] || continue
			case $p in
			"$KUBELET_DIR" | "$STORE_DIR" | /var/log/pods | /var/log/containers | /var/lib/cni) rm -rf --one-file-system "$p" ;;
			*) rm -rf --one-file-system "$p" 2>/dev/null || true ;;
			esac
			[ -e "$p" ] || log "removed $p"
		done <"$STATE/created"
	fi
	if [ -d "$LOGS" ]; then
		rm -rf "$KEEP_LOGS"
		cp -r "$LOGS" "$KEEP_LOGS" && log "logs kept in $KEEP_LOGS"
	fi
	if [ -n "$(mounts_under "$STATE" "$RUN")" ]; then
		die "not removing $STATE and $RUN: something is still mounted there"
	fi
	rm -rf --one-file-system "$STATE" "$RUN"
	log "down"
}

# --- status, logs -----------------------------------------------------------------------

cmd_status() {
	local c
	for c in "${COMPONENTS[@]}"; do
		if alive "$c"; then echo "$c: running (pid $(cut -d' ' -f1 "$RUN/$c.pid"))"; else echo "$c: not running"; fi
	done
	if alive kube-apiserver; then kubectl_ get nodes -o wide 2>&1 || true; fi
}

cmd_logs() {
	local n=${1:-150} c
	echo "===== e2e cluster: components"
	cmd_status || true
	if alive kube-apiserver; then
		echo "===== kubectl get pods -A -o wide"
		kubectl_ get pods -A -o wide 2>&1 || true
		echo "===== kubectl get events -A"
		kubectl_ get events -A --sort-by=.lastTimestamp 2>&1 | tail -n 80 || true
		echo "===== kubectl get csinode -o yaml"
		kubectl_ get csinode -o yaml 2>&1 | tail -n 30 || true
		echo "===== pods not Running: kubectl describe"
		kubectl_ get pods -A --no-headers 2>/dev/null | awk '$4 != "Running" {print $1, $2}' | while read -r ns p; do
			kubectl_ -n "$ns" describe pod "$p" 2>&1 | tail -n 40
		done
		echo "===== driver logs (kubectl -n wasm-csi logs)"
		kubectl_ -n wasm-csi logs -l app.kubernetes.io/name=wasm-csi --tail="$n" --prefix 2>&1 || true
		kubectl_ -n wasm-csi logs -l app.kubernetes.io/name=wasm-csi --tail="$n" --prefix --previous 2>/dev/null || true
	fi
	for c in kubelet containerd kube-apiserver kube-controller-manager kube-scheduler etcd; do
		[ -f "$LOGS/$c.log" ] || continue
		echo "===== $c log (last $n lines of $LOGS/$c.log)"
		tail -n "$n" "$LOGS/$c.log"
	done
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
logs) cmd_logs "${2:-150}" ;;
env) echo "export KUBECONFIG=$STATE/pki/admin.kubeconfig PATH=$BIN:\$PATH" ;;
*)
	echo "usage: $0 up|down|status|logs [LINES]|env" >&2
	exit 2
	;;
esac
