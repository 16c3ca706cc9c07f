package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/kubenode"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// Names shared with test/e2e/cluster.sh and test/e2e/overlay.
const (
	driverName      = "wasm.csi.dev"
	driverNamespace = "wasm-csi"
	driverDaemonSet = "wasm-csi-node"
	driverImage     = "e2e.wasm-csi.local/wasm-csi-driver:e2e"
	gatewayImage    = "e2e.wasm-csi.local/gateway:e2e"
	driverMetrics   = "http://127.0.0.1:9809/metrics" // the overlay's --metrics-address, on the host network
	kubeletDir      = "/var/lib/kubelet"
	storeDir        = "/var/lib/wasm-csi"
	volumeName      = "filter"
	modulePath      = "/etc/wasm/plugin.wasm"
)

// cluster runs kubectl as the admin against the e2e cluster, in namespace ns
// unless an argument says otherwise.
type cluster struct {
	t          *testing.T
	root       string
	kubectl    string
	kubeconfig string
	node       string
	ns         string
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// run runs kubectl and returns its standard output; an error carries its
// standard error.
func (c *cluster) run(stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.kubectl, append([]string{"--kubeconfig=" + c.kubeconfig}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func (c *cluster) must(args ...string) string {
	c.t.Helper()
	out, err := c.run("", args...)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// apply applies objects (JSON or YAML) with kubectl apply -f -.
func (c *cluster) apply(objs ...any) {
	c.t.Helper()
	var docs []string
	for _, o := range objs {
		b, err := json.Marshal(o)
		if err != nil {
			c.t.Fatal(err)
		}
		docs = append(docs, string(b))
	}
	if _, err := c.run(strings.Join(docs, "\n---\n"), "apply", "-f", "-"); err != nil {
		c.t.Fatal(err)
	}
}

func (c *cluster) getJSON(into any, args ...string) error {
	out, err := c.run("", append(args, "-o", "json")...)
	if err != nil {
		return err
	}
	return json.Unmarshal([]byte(out), into)
}

func (c *cluster) pod(name string) (*corev1.Pod, error) {
	var p corev1.Pod
	if err := c.getJSON(&p, "-n", c.ns, "get", "pod", name); err != nil {
		return nil, err
	}
	return &p, nil
}

func (c *cluster) pods(selector string) ([]corev1.Pod, error) {
	var l corev1.PodList
	if err := c.getJSON(&l, "-n", c.ns, "get", "pods", "-l", selector); err != nil {
		return nil, err
	}
	return l.Items, nil
}

// events returns the events about the pod in the test namespace, oldest first.
func (c *cluster) events(pod string) ([]corev1.Event, error) {
	var l corev1.EventList
	if err := c.getJSON(&l, "-n", c.ns, "get", "events", "--field-selector", "involvedObject.kind=Pod,involvedObject.name="+pod); err != nil {
		return nil, err
	}
	return l.Items, nil
}

// waitUntil polls f every half second until it reports done, and fails the
// test after timeout with f's last word on why not.
func waitUntil(t *testing.T, timeout time.Duration, what string, f func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	start := time.Now()
	var last string
	for {
		done, why := f()
		if done {
			t.Logf("%s after %v", what, time.Since(start).Round(100*time.Millisecond))
			return
		}
		last = why
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v: %s", what, timeout, last)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (c *cluster) waitPodReady(name string, timeout time.Duration) *corev1.Pod {
	c.t.Helper()
	var pod *corev1.Pod
	waitUntil(c.t, timeout, "pod "+name+" Running and Ready", func() (bool, string) {
		p, err := c.pod(name)
		if err != nil {
			return false, err.Error()
		}
		pod = p
		if p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
			c.t.Fatalf("pod %s ended: %s", name, kubenode.PodState(p))
		}
		return kubenode.PodReady(p), kubenode.PodState(p)
	})
	return pod
}

func (c *cluster) waitPodGone(name string, timeout time.Duration) {
	c.t.Helper()
	waitUntil(c.t, timeout, "pod "+name+" deleted", func() (bool, string) {
		out, err := c.run("", "-n", c.ns, "get", "pod", name, "--ignore-not-found", "-o", "name")
		if err != nil {
			return false, err.Error()
		}
		return strings.TrimSpace(out) == "", "still there"
	})
}

// --- the gateway -----------------------------------------------------------------

type podOpts struct {
	labels      map[string]string
	sha256      string
	pullSecrets []string
	// writable sets the volume's readOnly to false: the contract says the
	// file is read-only whatever readOnly says.
	writable bool
}

// gatewayPodSpec is a pod of the test gateway with the module of image in the
// driver's inline volume at /etc/wasm, as users write it.
func gatewayPodSpec(image string, o podOpts) corev1.PodSpec {
	attrs := map[string]string{"image": image}
	if o.sha256 != "" {
		attrs["sha256"] = o.sha256
	}
	readOnly, automount := !o.writable, false
	grace := int64(2)
	spec := corev1.PodSpec{
		// The cluster has no DNS service: the host's resolv.conf, without
		// a MissingClusterDNS warning in every describe.
		DNSPolicy:                     corev1.DNSDefault,
		TerminationGracePeriodSeconds: &grace,
		AutomountServiceAccountToken:  &automount,
		Containers: []corev1.Container{{
			Name:            "gateway",
			Image:           gatewayImage,
			ImagePullPolicy: corev1.PullNever,
			Ports:           []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
			ReadinessProbe: &corev1.Probe{
				ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(8080)}},
				PeriodSeconds: 2,
			},
			Resources: corev1.ResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")},
				Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
			},
			VolumeMounts: []corev1.VolumeMount{{Name: volumeName, MountPath: "/etc/wasm"}},
		}},
		Volumes: []corev1.Volume{{
			Name: volumeName,
			VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
				Driver:           driverName,
				ReadOnly:         &readOnly,
				VolumeAttributes: attrs,
			}},
		}},
	}
	for _, s := range o.pullSecrets {
		spec.ImagePullSecrets = append(spec.ImagePullSecrets, corev1.LocalObjectReference{Name: s})
	}
	return spec
}

func (c *cluster) gatewayPod(name, image string, o podOpts) *corev1.Pod {
	labels := map[string]string{"app": "gateway", "pod": name}
	for k, v := range o.labels {
		labels[k] = v
	}
	return &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: c.ns, Labels: labels},
		Spec:       gatewayPodSpec(image, o),
	}
}

func (c *cluster) gatewayDeployment(name, image string, replicas int32) *appsv1.Deployment {
	labels := map[string]string{"app": name}
	return &appsv1.Deployment{
		TypeMeta:   metav1.TypeMeta{APIVersion: "apps/v1", Kind: "Deployment"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: c.ns},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       gatewayPodSpec(image, podOpts{}),
			},
		},
	}
}

// loadedLine is what the gateway prints once it has loaded its module.
var loadedLine = regexp.MustCompile(`wasm-gateway: loaded (\S+) sha256=([0-9a-f]{64}) bytes=(\d+) readonly=(\w+)`)

type loaded struct {
	path, sha256 string
	bytes        int
	readonly     bool
}

// checkLoaded asserts, from kubectl logs, that pod's gateway loaded exactly
// the module m (sha256 and size) from a read-only file, ran it (the
// module's own log message) and started.
func (c *cluster) checkLoaded(pod string, m module) {
	c.t.Helper()
	out, err := c.run("", "-n", c.ns, "logs", pod, "-c", "gateway")
	if err != nil {
		c.t.Fatal(err)
	}
	l := loadedLine.FindStringSubmatch(out)
	if l == nil {
		c.t.Fatalf("no %q line in the log of %s:\n%s", "wasm-gateway: loaded", pod, out)
	}
	if l[1] != modulePath || l[2] != m.sha256 || l[3] != strconv.Itoa(len(m.bytes)) || l[4] != "true" {
		c.t.Fatalf("pod %s: %q; want %s sha256=%s bytes=%d readonly=true", pod, l[0], modulePath, m.sha256, len(m.bytes))
	}
	for _, want := range []string{"wasm-gateway: module log info: " + m.message, "wasm-gateway: started abi="} {
		if !strings.Contains(out, want) {
			c.t.Fatalf("pod %s: no %q in its log:\n%s", pod, want, out)
		}
	}
}

// startGateway creates the gateway pod name with module m in its volume,
// waits until it is Ready and checks (checkLoaded) that it loaded m.
func (c *cluster) startGateway(name string, m module, o podOpts) {
	c.t.Helper()
	c.apply(c.gatewayPod(name, m.image, o))
	c.waitPodReady(name, 2*time.Minute)
	c.checkLoaded(name, m)
}

// editDriverConfig changes the driver's config.yaml in its config map with
// edit (on the parsed YAML) and puts the original back when the test ends.
func (c *cluster) editDriverConfig(edit func(cfg map[string]any)) {
	c.t.Helper()
	var cm corev1.ConfigMap
	if err := c.getJSON(&cm, "-n", driverNamespace, "get", "configmap", "wasm-csi-config"); err != nil {
		c.t.Fatal(err)
	}
	orig := cm.Data["config.yaml"]
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(orig), &cfg); err != nil {
		c.t.Fatalf("the config map's config.yaml: %v", err)
	}
	edit(cfg)
	edited, err := yaml.Marshal(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	patch := func(data string) error {
		p, _ := json.Marshal(map[string]any{"data": map[string]string{"config.yaml": data}})
		_, err := c.run("", "-n", driverNamespace, "patch", "configmap", "wasm-csi-config", "--type=merge", "-p", string(p))
		return err
	}
	if err := patch(string(edited)); err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() {
		if err := patch(orig); err != nil {
			c.t.Logf("restore the config map: %v", err)
		}
	})
}

// startReport is what the running gateway reports (GET /module, through
// the apiserver's pod proxy) about the module it loaded at start.
func (c *cluster) startReport(pod string) (sha string, raw string, err error) {
	raw, err = c.run("", "get", "--raw", fmt.Sprintf("/api/v1/namespaces/%s/pods/%s:8080/proxy/module", c.ns, pod))
	if err != nil {
		return "", raw, err
	}
	var m struct {
		SHA256        string `json:"sha256"`
		ReadOnly      bool   `json:"readonly"`
		VMStartResult uint32 `json:"vmStartResult"`
	}
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		return "", raw, fmt.Errorf("GET /module of %s: %v: %s", pod, err, raw)
	}
	if !m.ReadOnly || m.VMStartResult == 0 {
		return m.SHA256, raw, fmt.Errorf("GET /module of %s: readonly=%v vmStartResult=%d", pod, m.ReadOnly, m.VMStartResult)
	}
	return m.SHA256, raw, nil
}

// readNow reads and loads the pod's module file again, now, inside the
// running pod: kubectl exec of the gateway's -check mode (the image has no
// shell). It returns what the "loaded" line says.
func (c *cluster) readNow(pod string) (loaded, error) {
	out, err := c.run("", "-n", c.ns, "exec", pod, "-c", "gateway", "--", "/gateway", "-check")
	if err != nil {
		return loaded{}, fmt.Errorf("%v\n%s", err, out)
	}
	m := loadedLine.FindStringSubmatch(out)
	if m == nil {
		return loaded{}, fmt.Errorf("kubectl exec %s -- /gateway -check: no loaded line:\n%s", pod, out)
	}
	n, _ := strconv.Atoi(m[3])
	return loaded{path: m[1], sha256: m[2], bytes: n, readonly: m[4] == "true"}, nil
}

// --- the node ----------------------------------------------------------------------

func volumeTarget(podUID string) string {
	return filepath.Join(kubeletDir, "pods", podUID, "volumes", "kubernetes.io~csi", volumeName, "mount")
}

// volumeRecords returns the driver's volume records (files in its store) of
// the pod with this uid.
func volumeRecords(podUID string) ([]string, error) {
	files, err := filepath.Glob(filepath.Join(storeDir, "volumes", "*.json"))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // removed meanwhile
		}
		var rec struct {
			PodUID string `json:"podUID"`
		}
		if json.Unmarshal(b, &rec) == nil && rec.PodUID == podUID {
			out = append(out, f)
		}
	}
	return out, nil
}

// metrics scrapes the driver's Prometheus endpoint: sample (name with labels,
// as written) to value.
func metrics() (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, driverMetrics, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", driverMetrics, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, err
	}
	m := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, nil
}

func metric(t *testing.T, name string) float64 {
	t.Helper()
	m, err := metrics()
	if err != nil {
		t.Fatalf("driver metrics: %v", err)
	}
	return m[name]
}

var errNoDriverPod = errors.New("no driver pod")

// driverPod returns the driver's pod on the node.
func (c *cluster) driverPod() (*corev1.Pod, error) {
	var l corev1.PodList
	if err := c.getJSON(&l, "-n", driverNamespace, "get", "pods", "-l", "app.kubernetes.io/name=wasm-csi"); err != nil {
		return nil, err
	}
	var live []corev1.Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil {
			live = append(live, p)
		}
	}
	if len(live) != 1 {
		return nil, fmt.Errorf("%w: %d driver pods", errNoDriverPod, len(live))
	}
	return &live[0], nil
}

// csiNodeDrivers lists the drivers registered with kubelet on the node.
func (c *cluster) csiNodeDrivers() ([]string, error) {
	out, err := c.run("", "get", "csinode", c.node, "-o", "jsonpath={.spec.drivers[*].name}")
	if err != nil {
		return nil, err
	}
	return strings.Fields(out), nil
}

// diagnose prints what a person needs when the suite failed: the test
// namespace's pods, events and the describe of every pod that is not
// Ready, the driver's logs. The node's logs (kubelet, containerd) come from
// `test/e2e/cluster.sh logs`, which run.sh prints after a failure.
func (c *cluster) diagnose() {
	section := func(title string, args ...string) {
		out, err := c.run("", args...)
		if err != nil {
			out += "\n" + err.Error()
		}
		c.t.Logf("===== %s\n%s", title, out)
	}
	section("kubectl get pods -A -o wide", "get", "pods", "-A", "-o", "wide")
	section("kubectl get events -n "+c.ns, "-n", c.ns, "get", "events", "--sort-by=.lastTimestamp")
	var l corev1.PodList
	if err := c.getJSON(&l, "-n", c.ns, "get", "pods"); err == nil {
		for i := range l.Items {
			if !kubenode.PodReady(&l.Items[i]) {
				section("kubectl describe pod "+l.Items[i].Name, "-n", c.ns, "describe", "pod", l.Items[i].Name)
			}
		}
	}
	section("kubectl -n wasm-csi describe pods", "-n", driverNamespace, "describe", "pods")
	section("driver logs", "-n", driverNamespace, "logs", "-l", "app.kubernetes.io/name=wasm-csi", "--tail=200", "--prefix")
	out, _ := c.run("", "-n", driverNamespace, "logs", "-l", "app.kubernetes.io/name=wasm-csi", "--tail=100", "--prefix", "--previous")
	if out != "" {
		c.t.Logf("===== driver logs, previous container\n%s", out)
	}
}
