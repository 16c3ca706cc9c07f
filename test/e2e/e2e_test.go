package e2e

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	corev1 "k8s.io/api/core/v1"

	"github.com/wasm-csi/wasm-csi/test/lib/kubenode"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/signtest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// module is a proxy-wasm module pushed for the suite.
type module struct {
	bytes   []byte
	message string        // what proxy_on_vm_start logs
	sha256  string        // hex of the module's bytes: what the gateway reports
	layer   digest.Digest // the blob the driver downloads (CNCF layout: the module itself)
	image   string        // the reference pods use
}

// newModule makes a proxy-wasm module unique to this run (so that nothing
// from an earlier run on the same node is in the driver's store) and pushes
// it to ref in the CNCF layout; pods name it as image.
func newModule(t *testing.T, run, name, pushRef, image string, opts ...registrytest.PushOption) module {
	t.Helper()
	msg := fmt.Sprintf("wasm-csi e2e %s %s", run, name)
	b := wasmgen.ProxyWasm(wasmgen.Options{Message: msg})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := registrytest.PushWasm(ctx, pushRef, b, registrytest.LayoutCNCF, append([]registrytest.PushOption{registrytest.WithPlainHTTP(true)}, opts...)...); err != nil {
		t.Fatalf("push %s: %v", pushRef, err)
	}
	sum := sha256.Sum256(b)
	return module{bytes: b, message: msg, sha256: hex.EncodeToString(sum[:]), layer: digest.FromBytes(b), image: image}
}

func TestE2E(t *testing.T) {
	if os.Getenv("WASM_CSI_E2E") != "1" {
		t.Skip("end-to-end suite: set WASM_CSI_E2E=1 with test/e2e/cluster.sh up, or run `make e2e`")
	}
	root := repoRoot(t)
	binDir := envOr("WASM_CSI_KUBE_BIN_DIR", filepath.Join(root, "bin"))
	if os.Getenv("WASM_CSI_REGISTRY_BIN") == "" {
		t.Setenv("WASM_CSI_REGISTRY_BIN", filepath.Join(root, "bin", "registry"))
	}
	nonce := make([]byte, 3)
	_, _ = rand.Read(nonce)
	run := hex.EncodeToString(nonce)
	c := &cluster{
		t:          t,
		root:       root,
		kubectl:    filepath.Join(binDir, "kubectl"),
		kubeconfig: envOr("WASM_CSI_E2E_KUBECONFIG", "/var/lib/wasm-csi-e2e/pki/admin.kubeconfig"),
		node:       envOr("WASM_CSI_E2E_NODE", "wasm-csi-e2e"),
		ns:         "e2e-" + run,
	}
	started := time.Now()

	// The cluster must be up: WASM_CSI_E2E=1 means it was asked for.
	if _, err := os.Stat(c.kubeconfig); err != nil {
		t.Fatalf("no e2e cluster: %v (start one with test/e2e/cluster.sh up, or run make e2e)", err)
	}
	if out, err := c.run("", "get", "--raw", "/readyz"); err != nil || strings.TrimSpace(out) != "ok" {
		t.Fatalf("the e2e cluster's apiserver is not ready: %q %v", out, err)
	}
	if s := c.must("get", "node", c.node, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`); s != "True" {
		t.Fatalf("node %s is not Ready (%q)", c.node, s)
	}
	t.Logf("node: %s", c.must("get", "node", c.node, "-o", "jsonpath={.status.nodeInfo.kubeletVersion} {.status.nodeInfo.containerRuntimeVersion} {.status.nodeInfo.osImage}"))

	c.must("create", "namespace", c.ns)
	t.Cleanup(func() {
		if _, err := c.run("", "delete", "namespace", c.ns, "--wait=true", "--timeout=120s"); err != nil {
			t.Logf("delete namespace %s: %v", c.ns, err)
		}
	})
	t.Cleanup(func() {
		if t.Failed() {
			c.diagnose()
		}
		t.Logf("suite took %v", time.Since(started).Round(time.Second))
	})
	// The namespace's default ServiceAccount comes from the controller-manager.
	waitUntil(t, time.Minute, "serviceaccount "+c.ns+"/default", func() (bool, string) {
		_, err := c.run("", "-n", c.ns, "get", "serviceaccount", "default")
		return err == nil, fmt.Sprint(err)
	})

	// Registries on the host's 127.0.0.1, which the driver reaches because
	// the e2e overlay runs it with hostNetwork. Pods name the open one through
	// its counting proxy.
	reg := registrytest.StartT(t, registrytest.Options{})
	const user = "e2e"
	password := "pw-" + run
	authReg := registrytest.StartT(t, registrytest.Options{Htpasswd: map[string]string{user: password}})
	t.Logf("registries: open %s (proxy %s), htpasswd %s", reg.Host(), reg.ProxyHost(), authReg.Host())

	// First the Helm chart, installed, shown serving a gateway, and
	// uninstalled; then the kustomize install the rest of the suite uses.
	t.Run("helm install: the chart's driver serves a gateway, then uninstalls", func(t *testing.T) {
		modH := newModule(t, run, "helm", reg.Host()+"/e2e/filter-helm:1.0", reg.ProxyHost()+"/e2e/filter-helm:1.0")
		testHelmInstall(t, c.with(t), modH)
	})

	if !t.Run("install", func(t *testing.T) { testInstall(t, c.with(t)) }) {
		t.FailNow()
	}

	modA := newModule(t, run, "a", reg.Host()+"/e2e/filter-a:1.0", reg.ProxyHost()+"/e2e/filter-a:1.0")

	t.Run("gateway loads the exact module, read-only", func(t *testing.T) {
		c := c.with(t)
		c.startGateway("gw-a", modA, podOpts{})
		sha, raw, err := c.startReport("gw-a")
		if err != nil || sha != modA.sha256 {
			t.Fatalf("GET /module of gw-a: sha256 %q (%v), want %s: %s", sha, err, modA.sha256, raw)
		}
		t.Logf("gw-a: kubectl logs shows sha256=%s bytes=%d readonly=true; GET /module: %s", modA.sha256, len(modA.bytes), strings.TrimSpace(raw))
		if n := reg.BlobGets(modA.layer); n != 1 {
			t.Errorf("module a's blob was downloaded %d times, want 1", n)
		}
	})

	t.Run("readOnly false in the pod: still a read-only file", func(t *testing.T) {
		c := c.with(t)
		c.startGateway("gw-rw", modA, podOpts{writable: true})
		c.must("-n", c.ns, "delete", "pod", "gw-rw", "--grace-period=1", "--wait=false")
	})

	t.Run("describe pod names the image and the digest", func(t *testing.T) {
		c := c.with(t)
		describe := c.must("-n", c.ns, "describe", "pod", "gw-a")
		events := describe[strings.LastIndex(describe, "Events:"):]
		for _, want := range []string{"Pulling", "Pulled", modA.image, "sha256:" + modA.sha256} {
			if !strings.Contains(events, want) {
				t.Errorf("kubectl describe pod gw-a: events do not mention %q:\n%s", want, events)
			}
		}
		t.Logf("kubectl describe pod gw-a:\n%s", events)
	})

	t.Run("10 pods, one download", func(t *testing.T) {
		c := c.with(t)
		modB := newModule(t, run, "b", reg.Host()+"/e2e/filter-b:1.0", reg.ProxyHost()+"/e2e/filter-b:1.0")
		successBefore := metric(t, `wasmcsi_pulls_total{result="success"}`)
		c.apply(c.gatewayDeployment("fleet", modB.image, 10))
		waitUntil(t, 3*time.Minute, "deployment fleet: 10 pods Ready", func() (bool, string) {
			pods, err := c.pods("app=fleet")
			if err != nil {
				return false, err.Error()
			}
			ready, states := 0, map[string]int{}
			for i := range pods {
				if kubenode.PodReady(&pods[i]) {
					ready++
				}
				states[kubenode.PodState(&pods[i])]++
			}
			return ready == 10 && len(pods) == 10, fmt.Sprintf("%d/%d ready: %v", ready, len(pods), states)
		})
		pods, err := c.pods("app=fleet")
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods {
			c.checkLoaded(p.Name, modB)
		}
		counts := reg.Counts()
		if n := counts.BlobGets[modB.layer]; n != 1 {
			t.Errorf("10 pods: the registry served module b's blob %d times, want 1", n)
		}
		pulls := metric(t, `wasmcsi_pulls_total{result="success"}`) - successBefore
		if pulls != 1 {
			t.Errorf("10 pods: wasmcsi_pulls_total{result=\"success\"} went up by %v, want 1", pulls)
		}
		t.Logf("10 pods loaded sha256=%s; registry blob GETs of the module: %d; manifest GETs: %v; driver pulls: +%v",
			modB.sha256, counts.BlobGets[modB.layer], counts.ManifestGets, pulls)
	})

	t.Run("pull secrets: with them the module comes, without them a pod event says why", func(t *testing.T) {
		c := c.with(t)
		modP := newModule(t, run, "private", authReg.Host()+"/e2e/private:1.0", authReg.Host()+"/e2e/private:1.0",
			registrytest.WithBasicAuth(user, password))
		c.must("-n", c.ns, "create", "secret", "docker-registry", "regcred",
			"--docker-server="+authReg.Host(), "--docker-username="+user, "--docker-password="+password)

		c.apply(c.gatewayPod("gw-noauth", modP.image, podOpts{}))
		var refusal string
		waitUntil(t, 2*time.Minute, "an event on gw-noauth saying why its volume was refused", func() (bool, string) {
			evs, err := c.events("gw-noauth")
			if err != nil {
				return false, err.Error()
			}
			var seen []string
			for _, e := range evs {
				seen = append(seen, e.Reason+": "+e.Message)
				if e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, modP.image) &&
					regexp.MustCompile(`PermissionDenied|Unauthenticated|credentials|unauthorized`).MatchString(e.Message) {
					refusal = e.Reason + ": " + e.Message
					return true, ""
				}
			}
			return false, fmt.Sprintf("events: %q", seen)
		})
		t.Logf("gw-noauth refused: %s", refusal)

		c.startGateway("gw-auth", modP, podOpts{pullSecrets: []string{"regcred"}})

		// The module is on the node now, pulled with gw-auth's secret: the
		// pod without credentials still does not get it.
		time.Sleep(3 * time.Second)
		p, err := c.pod("gw-noauth")
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.Phase == corev1.PodRunning {
			t.Errorf("gw-noauth, without pull secrets, is Running: %s", kubenode.PodState(p))
		}
		out := c.must("-n", c.ns, "describe", "pod", "gw-noauth")
		t.Logf("kubectl describe pod gw-noauth (events):\n%s", out[strings.LastIndex(out, "Events:"):])
		c.must("-n", c.ns, "delete", "pod", "gw-noauth", "--wait=false")
	})

	t.Run("driver pod replaced: running gateways keep their files, new pods start", func(t *testing.T) {
		c := c.with(t)
		old, err := c.driverPod()
		if err != nil {
			t.Fatal(err)
		}
		gateways := []string{"gw-a"}
		if pods, err := c.pods("app=fleet"); err == nil {
			for _, p := range pods {
				gateways = append(gateways, p.Name)
			}
		}
		want := map[string]string{}
		for _, g := range gateways {
			l, err := c.readNow(g)
			if err != nil {
				t.Fatal(err)
			}
			want[g] = l.sha256
		}
		c.must("-n", driverNamespace, "delete", "pod", old.Name, "--wait=true", "--timeout=90s")
		t.Logf("deleted driver pod %s (uid %s)", old.Name, old.UID)
		// With no driver, and then with the new one: every running gateway
		// reads and loads its module file again (kubectl exec).
		checkGateways := func(when string) {
			for _, g := range gateways {
				l, err := c.readNow(g)
				if err != nil || l.sha256 != want[g] || !l.readonly {
					t.Fatalf("%s: %s re-read its module: %+v (%v), want sha256=%s readonly", when, g, l, err, want[g])
				}
			}
			t.Logf("%s: %d running gateways re-read their modules (kubectl exec /gateway -check): same sha256, read-only", when, len(gateways))
		}
		checkGateways("driver pod deleted")
		var fresh *corev1.Pod
		waitUntil(t, 2*time.Minute, "a new driver pod Ready", func() (bool, string) {
			p, err := c.driverPod()
			if err != nil {
				return false, err.Error()
			}
			if p.UID == old.UID {
				return false, "the old pod"
			}
			fresh = p
			return kubenode.PodReady(p), kubenode.PodState(p)
		})
		waitUntil(t, time.Minute, "the new driver registered with kubelet (csinode)", func() (bool, string) {
			d, err := c.csiNodeDrivers()
			return err == nil && contains(d, driverName), fmt.Sprintf("drivers %v, %v", d, err)
		})
		checkGateways("new driver pod " + fresh.Name)
		for _, g := range gateways {
			p, err := c.pod(g)
			if err != nil {
				t.Fatal(err)
			}
			if !kubenode.PodReady(p) || p.Status.ContainerStatuses[0].RestartCount != 0 {
				t.Errorf("gateway %s after the driver's restart: %s", g, kubenode.PodState(p))
			}
		}
		// New pods start: one with the module already stored (no download),
		// one with a new module.
		modC := newModule(t, run, "c", reg.Host()+"/e2e/filter-c:1.0", reg.ProxyHost()+"/e2e/filter-c:1.0")
		getsA := reg.BlobGets(modA.layer)
		c.apply(c.gatewayPod("gw-a2", modA.image, podOpts{}), c.gatewayPod("gw-c", modC.image, podOpts{}))
		c.waitPodReady("gw-a2", 2*time.Minute)
		c.waitPodReady("gw-c", 2*time.Minute)
		c.checkLoaded("gw-a2", modA)
		c.checkLoaded("gw-c", modC)
		if n := reg.BlobGets(modA.layer); n != getsA {
			t.Errorf("module a downloaded again after the driver's restart (%d -> %d blob GETs): the store was not kept", getsA, n)
		}
	})

	t.Run("deleting a gateway pod unmounts and cleans its volume", func(t *testing.T) {
		c := c.with(t)
		p, err := c.pod("gw-a")
		if err != nil {
			t.Fatal(err)
		}
		uid := string(p.UID)
		target := volumeTarget(uid)
		m, ok, err := kubenode.MountOf(target)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			t.Fatalf("%s is not a mount point on the host", target)
		}
		opts := m.Opts()
		if !contains(opts, "ro") || !contains(opts, "nosuid") || !contains(opts, "nodev") {
			t.Errorf("the volume of gw-a is mounted %s, want ro,nosuid,nodev", strings.Join(opts, ","))
		}
		recs, err := volumeRecords(uid)
		if err != nil || len(recs) != 1 {
			t.Fatalf("volume records of gw-a in %s: %v %v", storeDir, recs, err)
		}
		t.Logf("before: %s", m)
		c.must("-n", c.ns, "delete", "pod", "gw-a", "--wait=false")
		c.waitPodGone("gw-a", time.Minute)
		podDir := filepath.Join(kubeletDir, "pods", uid)
		waitUntil(t, time.Minute, "gw-a's volume unmounted, its pod directory and volume record removed", func() (bool, string) {
			if m, ok, err := kubenode.MountOf(target); err != nil {
				return false, err.Error()
			} else if ok {
				return false, "still mounted: " + m.String()
			}
			if _, err := os.Stat(podDir); err == nil {
				return false, podDir + " still exists"
			}
			if r, _ := volumeRecords(uid); len(r) > 0 {
				return false, fmt.Sprintf("volume records left: %v", r)
			}
			return true, ""
		})
		if _, err := os.Stat(filepath.Join(storeDir, "blobs", "sha256", modA.sha256)); err != nil {
			t.Errorf("module a left the store with its pod (gw-a2 still uses it): %v", err)
		}
	})

	t.Run("config map pre-pull takes effect without a restart", func(t *testing.T) {
		c := c.with(t)
		modD := newModule(t, run, "prepull", reg.Host()+"/e2e/prepulled:1.0", reg.ProxyHost()+"/e2e/prepulled:1.0")
		before, err := c.driverPod()
		if err != nil {
			t.Fatal(err)
		}
		restarts := before.Status.ContainerStatuses[0].RestartCount
		storedBefore := metric(t, "wasmcsi_store_modules")

		c.editDriverConfig(func(cfg map[string]any) {
			cfg["prePull"] = []map[string]string{{"image": modD.image}}
		})
		t.Logf("config map edited: prePull: [{image: %s}]", modD.image)

		blob := filepath.Join(storeDir, "blobs", "sha256", modD.sha256)
		waitUntil(t, 3*time.Minute, "the pre-pulled module on the node, no pod asking", func() (bool, string) {
			if _, err := os.Stat(blob); err != nil {
				return false, fmt.Sprintf("%s not there; registry blob GETs %d", blob, reg.BlobGets(modD.layer))
			}
			return true, ""
		})
		if n := reg.BlobGets(modD.layer); n != 1 {
			t.Errorf("pre-pull: %d blob GETs of the module, want 1", n)
		}
		t.Logf("wasmcsi_store_modules: %v -> %v", storedBefore, metric(t, "wasmcsi_store_modules"))
		logs := c.must("-n", driverNamespace, "logs", before.Name, "--tail=400")
		for _, l := range strings.Split(logs, "\n") {
			if strings.Contains(l, modD.image) {
				t.Logf("driver log: %s", l)
			}
		}
		after, err := c.driverPod()
		if err != nil {
			t.Fatal(err)
		}
		if after.UID != before.UID || after.Status.ContainerStatuses[0].RestartCount != restarts {
			t.Errorf("the driver restarted: pod %s/%s restarts %d -> pod %s/%s restarts %d",
				before.Name, before.UID, restarts, after.Name, after.UID, after.Status.ContainerStatuses[0].RestartCount)
		}

		// A pod that asks now finds it on the node.
		c.startGateway("gw-prepulled", modD, podOpts{})
		if n := reg.BlobGets(modD.layer); n != 1 {
			t.Errorf("the pod downloaded the pre-pulled module again (%d blob GETs)", n)
		}
		describe := c.must("-n", c.ns, "describe", "pod", "gw-prepulled")
		events := describe[strings.LastIndex(describe, "Events:"):]
		for _, want := range []string{modD.image, "already present on node", "sha256:" + modD.sha256} {
			if !strings.Contains(events, want) {
				t.Errorf("kubectl describe pod gw-prepulled: events do not mention %q:\n%s", want, events)
			}
		}
		t.Logf("kubectl describe pod gw-prepulled:\n%s", events)
	})

	t.Run("verification: a signed module is served, an unsigned one refused with a pod event", func(t *testing.T) {
		c := c.with(t)
		kp := signtest.GenerateKeyPair(t)
		good := newModule(t, run, "signed", reg.Host()+"/e2e/signed/good:1.0", reg.ProxyHost()+"/e2e/signed/good:1.0")
		bad := newModule(t, run, "unsigned", reg.Host()+"/e2e/signed/bad:1.0", reg.ProxyHost()+"/e2e/signed/bad:1.0")
		signtest.SignKey(t, kp, reg.Host()+"/e2e/signed/good:1.0", false)

		c.editDriverConfig(func(cfg map[string]any) {
			cfg["verification"] = map[string]any{"policies": []any{map[string]any{
				"name": "e2e-release", "images": []string{reg.ProxyHost() + "/e2e/signed"},
				"cosign": map[string]any{"ignoreTlog": true, "keys": []any{map[string]string{"pem": kp.PublicPEM}}},
			}}}
		})
		drv, err := c.driverPod()
		if err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 3*time.Minute, "the driver to load the verification policy", func() (bool, string) {
			logs, err := c.run("", "-n", driverNamespace, "logs", drv.Name, "--tail=200")
			return err == nil && (strings.Contains(logs, "verificationPolicies=1") || strings.Contains(logs, `"verificationPolicies":1`)), "no 'config loaded' line with the policy yet"
		})

		c.apply(c.gatewayPod("gw-signed", good.image, podOpts{}))
		c.apply(c.gatewayPod("gw-unsigned", bad.image, podOpts{}))
		c.waitPodReady("gw-signed", 2*time.Minute)
		c.checkLoaded("gw-signed", good)
		var refusal, verified string
		waitUntil(t, 2*time.Minute, "a Verified event on gw-signed and a refusal on gw-unsigned", func() (bool, string) {
			var seen []string
			for _, pod := range []string{"gw-signed", "gw-unsigned"} {
				evs, err := c.events(pod)
				if err != nil {
					return false, err.Error()
				}
				for _, e := range evs {
					seen = append(seen, pod+" "+e.Reason+": "+e.Message)
					switch {
					case pod == "gw-signed" && e.Reason == "Verified" && strings.Contains(e.Message, "e2e-release"):
						verified = e.Message
					case pod == "gw-unsigned" && e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, "e2e-release") &&
						strings.Contains(e.Message, "no signature"):
						refusal = e.Reason + ": " + e.Message
					}
				}
			}
			return verified != "" && refusal != "", fmt.Sprintf("events: %q", seen)
		})
		t.Logf("gw-signed: %s", verified)
		t.Logf("gw-unsigned refused: %s", refusal)
		p, err := c.pod("gw-unsigned")
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.Phase == corev1.PodRunning {
			t.Errorf("gw-unsigned is Running: %s", kubenode.PodState(p))
		}
		if n := reg.BlobGets(bad.layer); n != 1 {
			t.Logf("gw-unsigned: the registry served its blob %d times (each refused pull downloads, checks, drops)", n)
		}
		c.must("-n", c.ns, "delete", "pod", "gw-unsigned", "--wait=false")
	})
}

func testInstall(t *testing.T, c *cluster) {
	overlay := filepath.Join(c.root, "test", "e2e", "overlay")
	t.Logf("kubectl apply -k %s:\n%s", overlay, c.must("apply", "-k", overlay))
	c.must("-n", driverNamespace, "rollout", "status", "daemonset/"+driverDaemonSet, "--timeout=180s")
	p, err := c.driverPod()
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Spec.Containers[0].Image; got != driverImage {
		t.Errorf("driver pod image %s, want %s", got, driverImage)
	}
	if len(p.Spec.Containers) != 1 {
		t.Errorf("driver pod has %d containers, want 1 (it registers itself with kubelet)", len(p.Spec.Containers))
	}
	waitUntil(t, time.Minute, "kubectl get csinode lists "+driverName, func() (bool, string) {
		d, err := c.csiNodeDrivers()
		return err == nil && contains(d, driverName), fmt.Sprintf("drivers %v, %v", d, err)
	})
	t.Logf("kubectl get csinode %s:\n%s", c.node, c.must("get", "csinode", c.node))
	t.Logf("kubectl get csidriver:\n%s", c.must("get", "csidriver", driverName))
	if _, err := metrics(); err != nil {
		t.Errorf("driver metrics: %v", err)
	}
}

// with returns a copy of c that reports to t.
func (c *cluster) with(t *testing.T) *cluster {
	cc := *c
	cc.t = t
	return &cc
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
