// Package e2e is wasm-csi's end-to-end suite: the driver installed with
// the Helm chart (then uninstalled) and with `kubectl apply -k` on a real
// single-node cluster (kubelet, containerd,
// kube-apiserver, controller-manager, scheduler, all on 127.0.0.1) that
// test/e2e/cluster.sh builds and starts on this machine, and gateway pods
// that load their Wasm modules from the driver's volumes.
//
// `make e2e` (test/e2e/run.sh) brings the cluster up, runs the suite with
// WASM_CSI_E2E=1, prints the node's logs on failure and always tears the
// cluster down. Without WASM_CSI_E2E=1 (plain `go test ./...`) the suite is
// skipped; with it, a cluster that is not up is a failure.
//
// Needs: the cluster up (root to bring it up: cluster.sh mounts, runs
// kubelet and containerd, edits /etc/hosts), kubectl, distribution's
// registry (bin/registry), the cosign CLI (bin/cosign) and helm (bin/helm).
//
// Environment: WASM_CSI_E2E_KUBECONFIG (default
// /var/lib/wasm-csi-e2e/pki/admin.kubeconfig), WASM_CSI_E2E_NODE (default
// wasm-csi-e2e), WASM_CSI_KUBE_BIN_DIR (kubectl; default <repo>/bin),
// WASM_CSI_REGISTRY_BIN (distribution's registry; default <repo>/bin/registry).
package e2e
