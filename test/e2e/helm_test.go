package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// helmRelease is the release the suite installs: stored in the default
// namespace, while the chart puts the driver in its own (wasm-csi), as
// `helm install wasm-csi manifests/charts/wasm-csi` does.
const helmRelease = "wasm-csi"

// helm runs bin/helm against the cluster, with Helm's cache, config and
// data in temp directories (nothing of the host's Helm setup is read).
func (c *cluster) helm(args ...string) (string, error) {
	c.t.Helper()
	cmd := exec.Command(filepath.Join(c.root, "bin", "helm"), args...)
	home := c.t.TempDir()
	cmd.Env = append(os.Environ(), "KUBECONFIG="+c.kubeconfig, "HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"), "HELM_DATA_HOME="+filepath.Join(home, "data"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// testHelmInstall installs the driver with the Helm chart
// (manifests/charts/wasm-csi, with test/e2e/helm-values.yaml: the e2e
// overlay's wiring as values), shows a gateway pod served by it, then
// removes the pod and uninstalls the release, so that the kustomize install
// runs after it on a cluster without the driver. The store on the host
// stays, as it does across any reinstall.
func testHelmInstall(t *testing.T, c *cluster, mod module) {
	chart := filepath.Join(c.root, "manifests", "charts", "wasm-csi")
	values := filepath.Join(c.root, "test", "e2e", "helm-values.yaml")
	out, err := c.helm("install", helmRelease, chart, "--namespace", "default", "-f", values, "--wait", "--timeout", "3m")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("helm install %s %s -f %s:\n%s", helmRelease, chart, values, out)
	uninstalled := false
	uninstall := func() {
		if uninstalled {
			return
		}
		uninstalled = true
		if out, err := c.helm("uninstall", helmRelease, "--namespace", "default", "--wait", "--timeout", "3m"); err != nil {
			t.Error(err)
		} else {
			t.Logf("helm uninstall %s:\n%s", helmRelease, out)
		}
		// The chart's namespace goes with the release; the kustomize
		// install creates it again, and cannot while it terminates.
		waitUntil(t, 3*time.Minute, "namespace "+driverNamespace+" and CSIDriver "+driverName+" gone after helm uninstall", func() (bool, string) {
			if out, err := c.run("", "get", "namespace", driverNamespace, "--ignore-not-found", "-o", "name"); err != nil || strings.TrimSpace(out) != "" {
				return false, fmt.Sprintf("namespace: %q %v", out, err)
			}
			out, err := c.run("", "get", "csidriver", driverName, "--ignore-not-found", "-o", "name")
			return err == nil && strings.TrimSpace(out) == "", fmt.Sprintf("csidriver: %q %v", out, err)
		})
	}
	defer uninstall()

	c.must("-n", driverNamespace, "rollout", "status", "daemonset/"+driverDaemonSet, "--timeout=180s")
	p, err := c.driverPod()
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Labels["app.kubernetes.io/managed-by"]; got != "Helm" {
		t.Errorf("driver pod %s is labelled managed-by %q, want Helm: not the chart's", p.Name, got)
	}
	if got := p.Spec.Containers[0].Image; got != driverImage {
		t.Errorf("driver pod image %s, want %s", got, driverImage)
	}
	waitUntil(t, time.Minute, "kubectl get csinode lists "+driverName, func() (bool, string) {
		d, err := c.csiNodeDrivers()
		return err == nil && contains(d, driverName), fmt.Sprintf("drivers %v, %v", d, err)
	})
	out, err = c.helm("list", "--namespace", "default")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("helm list:\n%s", out)

	c.startGateway("gw-helm", mod, podOpts{})
	describe := c.must("-n", c.ns, "describe", "pod", "gw-helm")
	events := describe[strings.LastIndex(describe, "Events:"):]
	if !strings.Contains(events, "Pulled") || !strings.Contains(events, "sha256:"+mod.sha256) {
		t.Errorf("kubectl describe pod gw-helm: no Pulled event naming sha256:%s:\n%s", mod.sha256, events)
	}
	t.Logf("gw-helm served by the chart's driver %s; events:\n%s", p.Name, events)

	// The pod goes while the chart's driver runs, so that it unpublishes
	// the volume; then the release.
	c.must("-n", c.ns, "delete", "pod", "gw-helm", "--wait=false")
	c.waitPodGone("gw-helm", 2*time.Minute)
	uninstall()
}
