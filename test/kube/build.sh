#!/usr/bin/env bash
# Build Kubernetes components for wasm-csi's tests, and install etcd.
#
#   test/kube/build.sh BIN_DIR COMPONENT...
#
# COMPONENT is one of kube-apiserver, kubectl, kubelet, kube-controller-manager,
# kube-scheduler. Each is built from k8s.io/kubernetes on the Go module proxy
# through the wrapper module in test/kube/tools (see its go.mod) into BIN_DIR,
# unless BIN_DIR already holds a binary newer than the wrapper's go.mod, go.sum
# and this script. Etcd is Debian's etcd-server (/usr/bin/etcd), installed with
# apt-get when missing. Works non-interactively on a fresh Debian machine with
# Go installed; run as root (or with sudo available) for the apt-get step.
set -euo pipefail

usage() {
	echo "usage: $0 BIN_DIR COMPONENT..." >&2
	echo "  COMPONENT: kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler" >&2
	exit 2
}
[ $# -ge 2 ] || usage

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools="$here/tools"
bin_dir=$1
shift
mkdir -p "$bin_dir"
bin_dir=$(cd "$bin_dir" && pwd)
GO=${GO:-go}

log() { echo "kube-build: $*"; }

# The Kubernetes version comes from the wrapper's go.mod, so it is set in one place.
kube_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3} $1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$tools/go.mod" | head -n1)
if [[ ! $kube_version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+ ]]; then
	echo "kube-build: cannot find the k8s.io/kubernetes version in $tools/go.mod" >&2
	exit 1
fi
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}

# --- Kubernetes components -------------------------------------------------
pkgs=()
names=()
for c in "$@"; do
	case $c in
	kube-apiserver | kubectl | kubelet | kube-controller-manager | kube-scheduler) ;;
	etcd) continue ;; # always handled below
	*)
		echo "kube-build: unknown component $c" >&2
		usage
		;;
	esac
	out="$bin_dir/$c"
	if [ -x "$out" ] && [ "$out" -nt "$tools/go.mod" ] && [ "$out" -nt "$tools/go.sum" ] && [ "$out" -nt "${BASH_SOURCE[0]}" ]; then
		log "$c $kube_version is up to date in $bin_dir"
		continue
	fi
	pkgs+=("k8s.io/kubernetes/cmd/$c")
	names+=("$c")
done

if [ ${#pkgs[@]} -gt 0 ]; then
	command -v "$GO" >/dev/null || {
		echo "kube-build: $GO not found; install Go first" >&2
		exit 1
	}
	ldflags="-s -w"
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldflags+=" -X $p.gitVersion=$kube_version -X $p.gitMajor=$major -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
	done
	# Build into a temporary directory and move into place, so an interrupted
	# build never leaves a truncated binary that looks up to date.
	tmp=$(mktemp -d "$bin_dir/.kube-build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	log "building ${names[*]} $kube_version into $bin_dir (a clean Go cache takes minutes; later builds are fast)"
	start=$SECONDS
	(cd "$tools" && CGO_ENABLED=0 "$GO" build -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}")
	for c in "${names[@]}"; do
		mv -f "$tmp/$c" "$bin_dir/$c"
	done
	log "built ${names[*]} in $((SECONDS - start))s"
fi

# --- etcd ----------------------------------------------------------------------
if [ -x /usr/bin/etcd ]; then
	log "etcd is installed: $(/usr/bin/etcd --version 2>/dev/null | head -n1)"
else
	sudo=()
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null || {
			echo "kube-build: /usr/bin/etcd is missing; run as root or install etcd-server" >&2
			exit 1
		}
		sudo=(sudo)
	fi
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-cache show etcd-server >/dev/null 2>&1; then
		log "apt-get update"
		"${sudo[@]}" apt-get update -q
	fi
	log "apt-get install etcd-server"
	if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends etcd-server; then
		log "apt-get install failed; retrying after apt-get update"
		"${sudo[@]}" apt-get update -q
		"${sudo[@]}" apt-get install -y -q --no-install-recommends etcd-server
	fi
	# The package enables an etcd service on machines run by systemd. The tests
	# start their own etcd on free ports; do not leave a daemon behind.
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
		log "stopping and disabling the etcd.service the package started (the tests run their own)"
		"${sudo[@]}" systemctl disable --now etcd.service >/dev/null 2>&1 || true
	fi
	log "etcd installed: $(/usr/bin/etcd --version 2>/dev/null | head -n1)"
fi
