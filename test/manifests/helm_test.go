package manifests

// The Helm chart (manifests/charts/wasm-csi) against the kustomize install:
// one source of truth. The chart is rendered with the real helm CLI (built
// from the Go module proxy by `make bin/helm`, which this test runs when
// bin/helm is missing) and compared object by object with the kustomize
// build; the only difference allowed is Helm's own labels. The chart's
// config.yaml is compared as YAML (the same keys and values), since values
// hold it as structured data and the kustomize ConfigMap as commented text.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"sigs.k8s.io/yaml"
)

const chartDir = "manifests/charts/wasm-csi"

var blankLines = regexp.MustCompile(`\n{2,}`)

// helmLabels are the labels Helm's conventions add (the chart's
// wasm-csi.helmLabels): the one difference the chart may have.
var helmLabels = []string{"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version"}

var (
	helmOnce sync.Once
	helmPath string
	helmErr  error
)

// helmBinary returns bin/helm, building it with the Makefile's target (the
// one place its version is set) when it is not there.
func helmBinary(t *testing.T) string {
	t.Helper()
	helmOnce.Do(func() {
		root := repoRoot(t)
		helmPath = filepath.Join(root, "bin", "helm")
		if _, err := os.Stat(helmPath); err == nil {
			return
		}
		cmd := exec.Command("make", "-s", "-C", root, helmPath) // the Makefile names it by its absolute path
		if out, err := cmd.CombinedOutput(); err != nil {
			helmErr = fmt.Errorf("make bin/helm: %v\n%s", err, out)
		}
	})
	if helmErr != nil {
		t.Fatal(helmErr)
	}
	return helmPath
}

// helm runs the helm CLI with a private home (no user repositories or
// plugins) and returns its stdout.
func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(helmBinary(t), args...)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home+"/cache", "HELM_CONFIG_HOME="+home+"/config",
		"HELM_DATA_HOME="+home+"/data", "KUBECONFIG="+home+"/kubeconfig")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// renderChart renders the chart as `helm template wasm-csi` does, with the
// given extra arguments (--set ..., -f ...).
func renderChart(t *testing.T, args ...string) []doc {
	t.Helper()
	out, err := helm(t, append([]string{"template", "wasm-csi", chartDir}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	docs, err := splitYAML("helm template "+strings.Join(args, " "), []byte(out))
	if err != nil {
		t.Fatal(err)
	}
	return docs
}

// normalized returns d's JSON form without Helm's labels (on the
// object and on a pod template), with config.yaml of the config ConfigMap
// replaced by its parsed form, so that comments and key order do not count.
func normalized(t *testing.T, d doc, dropHelm bool) map[string]any {
	t.Helper()
	var obj map[string]any
	if err := json.Unmarshal(d.json, &obj); err != nil {
		t.Fatal(err)
	}
	if dropHelm {
		for _, labels := range []map[string]any{mapAt(obj, "metadata", "labels"), mapAt(obj, "spec", "template", "metadata", "labels")} {
			for _, l := range helmLabels {
				if _, ok := labels[l]; !ok && labels != nil {
					t.Errorf("%s: Helm's label %s is missing", d, l)
				}
				delete(labels, l)
			}
		}
	}
	// A container's ports are keyed by containerPort (their strategic merge
	// key), and kustomize's renderers order a patch's new ones differently:
	// compared in port order.
	forEachContainer(obj, func(c map[string]any) {
		ports := asList(c["ports"])
		sort.SliceStable(ports, func(i, j int) bool {
			pi, _ := ports[i].(map[string]any)
			pj, _ := ports[j].(map[string]any)
			return fmt.Sprint(pi["containerPort"]) < fmt.Sprint(pj["containerPort"])
		})
	})
	// kustomize re-emits a folded (>-) scalar with a more-indented line
	// with one more line break before it than the YAML it read: a CEL
	// expression's text then differs by a blank line between tokens, which
	// CEL ignores. Line breaks are compared as one.
	if d.kind() == "ValidatingAdmissionPolicy" {
		spec := mapAt(obj, "spec")
		for _, key := range []string{"matchConditions", "variables", "validations"} {
			for _, item := range asList(spec[key]) {
				m, _ := item.(map[string]any)
				for _, f := range []string{"expression", "messageExpression"} {
					if e, ok := m[f].(string); ok {
						m[f] = blankLines.ReplaceAllString(e, "\n")
					}
				}
			}
		}
	}
	if d.kind() == "ConfigMap" && d.name() == "wasm-csi-config" {
		data := mapAt(obj, "data")
		var cfg any
		if err := yaml.Unmarshal([]byte(str(data, "config.yaml")), &cfg); err != nil {
			t.Fatalf("%s: config.yaml: %v", d, err)
		}
		data["config.yaml"] = cfg
	}
	return obj
}

func objKey(d doc) string { return d.kind() + " " + d.namespace() + "/" + d.name() }

// compareInstalls fails on any object that is in one and not the other, or
// differs in anything but Helm's labels.
func compareInstalls(t *testing.T, chart, kustomize []doc, what string) {
	t.Helper()
	byKey := map[string]doc{}
	for _, d := range kustomize {
		byKey[objKey(d)] = d
	}
	seen := map[string]bool{}
	for _, d := range chart {
		k := objKey(d)
		seen[k] = true
		kd, ok := byKey[k]
		if !ok {
			t.Errorf("%s: the chart renders %s, which the kustomize build does not have", what, k)
			continue
		}
		if diff := cmp.Diff(normalized(t, kd, false), normalized(t, d, true)); diff != "" {
			t.Errorf("%s: %s differs (-kustomize +chart):\n%s", what, k, diff)
		}
	}
	for _, d := range kustomize {
		if !seen[objKey(d)] {
			t.Errorf("%s: the kustomize build has %s, which the chart does not render", what, objKey(d))
		}
	}
}

func TestHelmChartIsTheKustomizeInstall(t *testing.T) {
	compareInstalls(t, renderChart(t), build(t, baseDir), "default values vs kubectl kustomize "+baseDir)
}

func TestHelmChartSidecarsIsTheSidecarsOverlay(t *testing.T) {
	compareInstalls(t, renderChart(t, "--set", "sidecars.enabled=true"), build(t, sidecarsDir),
		"sidecars.enabled=true vs kubectl kustomize "+sidecarsDir)
}

func TestHelmChartAdmissionPolicyIsTheAllowedImagesOverlay(t *testing.T) {
	compareInstalls(t, renderChart(t, "--set", "admissionPolicy.enabled=true", "--set", "admissionPolicy.patterns={ghcr.io/acme}"),
		build(t, allowedImagesOverlay), "admissionPolicy.enabled=true vs kubectl kustomize "+allowedImagesOverlay)
}

// The policy's list is the driver's registries.allowed unless set apart,
// names the chart's driver, and a release without a list is refused.
func TestHelmChartAdmissionPolicyValues(t *testing.T) {
	docs := renderChart(t, "--set", "admissionPolicy.enabled=true", "--set", "driverName=wasm.example.com",
		"--set", "config.registries.allowed={ghcr.io/acme,registry.local:5000}")
	var policy map[string]any
	for _, d := range docs {
		if d.kind() == "ValidatingAdmissionPolicy" {
			policy = normalized(t, d, true)
		}
	}
	if policy == nil {
		t.Fatal("no ValidatingAdmissionPolicy rendered")
	}
	vars := asList(mapAt(policy, "spec")["variables"])
	first, _ := vars[0].(map[string]any)
	if first["name"] != "patterns" || first["expression"] != "['ghcr.io/acme', 'registry.local:5000']" {
		t.Errorf("patterns variable %v, want config.registries.allowed as a CEL list", first)
	}
	b, _ := json.Marshal(policy)
	if strings.Contains(string(b), "'wasm.csi.dev'") || !strings.Contains(string(b), "'wasm.example.com'") {
		t.Errorf("the policy does not match volumes of driver wasm.example.com only")
	}
	if out, err := helm(t, "template", "wasm-csi", chartDir, "--set", "admissionPolicy.enabled=true"); err == nil {
		t.Errorf("admissionPolicy.enabled without a list rendered:\n%s", out)
	}
	if out, err := helm(t, "template", "wasm-csi", chartDir, "--set", "admissionPolicy.enabled=true", "--set", "admissionPolicy.patterns={x'y}"); err == nil {
		t.Errorf("a pattern with a quote rendered:\n%s", out)
	}
}

func TestHelmLint(t *testing.T) {
	out, err := helm(t, "lint", "--strict", chartDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("helm lint --strict %s:\n%s", chartDir, out)
	// With the values people set, too.
	if out, err := helm(t, "lint", "--strict", chartDir, "-f", writeValues(t, customValues)); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("with custom values:\n%s", out)
	}
}

func writeValues(t *testing.T, v string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(f, []byte(v), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// customValues sets every value the chart offers away from its default.
const customValues = `
namespace: {name: wasm-edge}
driverName: wasm.example.com
image:
  repository: registry.example.com/wasm-csi-driver
  digest: sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  pullPolicy: Always
imagePullSecrets: [{name: regcred}]
resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {memory: 512Mi}}
nodeSelector: {node-role.example.com/gateway: "true"}
tolerations: [{key: dedicated, operator: Equal, value: gateway, effect: NoSchedule}]
hostNetwork: true
extraEnv: [{name: HTTPS_PROXY, value: "http://proxy.example.com:3128"}]
podLabels: {team: edge}
podAnnotations: {example.com/owner: edge}
config:
  registries:
    insecure: [registry.local:5000]
    mirrors: {ghcr.io: [mirror.internal:5000]}
    allowed: [ghcr.io/acme, registry.local:5000]
  limits: {maxStoreSize: 4Gi}
  prePull: [{image: ghcr.io/acme/filters/header:1.2.0}]
metrics:
  host: 127.0.0.1
  port: 9901
  podMonitor: {enabled: true, labels: {release: prom}}
extraHostMounts:
- {name: credential-providers, hostPath: /usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec}
- {name: containerd-certs, hostPath: /etc/containerd/certs.d, mountPath: /host/etc/containerd/certs.d, type: DirectoryOrCreate}
- {name: scratch, hostPath: /var/tmp/wasm-csi, readOnly: false}
extraArgs: [--log-level=debug]
admissionPolicy: {enabled: true}
`

// The values reach the objects, and what they render is still an install
// the driver accepts: strict decoding, the driver's own flag parsing, the
// driver name everywhere kubelet and pods look for it.
func TestHelmChartValues(t *testing.T) {
	docs := renderChart(t, "-f", writeValues(t, customValues))
	for _, d := range docs {
		if d.kind() == "PodMonitor" {
			checkPodMonitor(t, d)
			continue
		}
		decodeTyped(t, d)
		if ns := d.namespace(); !clusterScoped(d.kind()) && ns != "wasm-edge" {
			t.Errorf("%s is in namespace %q, want wasm-edge", d, ns)
		}
	}
	if n := only[*corev1.Namespace](t, docs); n.Name != "wasm-edge" || n.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace %s labels %v", n.Name, n.Labels)
	}
	if d := only[*storagev1.CSIDriver](t, docs); d.Name != "wasm.example.com" {
		t.Errorf("CSIDriver %s, want wasm.example.com", d.Name)
	}
	ds := only[*appsv1.DaemonSet](t, docs)
	spec := ds.Spec.Template.Spec
	c := driverContainer(t, ds)
	flags := parseArgs(t, c.Args)
	checks := map[string][2]string{
		"image":                  {c.Image, "registry.example.com/wasm-csi-driver@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
		"pullPolicy":             {string(c.ImagePullPolicy), "Always"},
		"--driver-name":          {flags["driver-name"], "wasm.example.com"},
		"--kubelet-csi-endpoint": {flags["kubelet-csi-endpoint"], "/var/lib/kubelet/plugins/wasm.example.com/csi.sock"},
		"--metrics-address":      {flags["metrics-address"], "127.0.0.1:9901"},
		"--log-level":            {flags["log-level"], "debug"},
		"liveness host:port":     {fmt.Sprintf("%s:%d", c.LivenessProbe.HTTPGet.Host, c.LivenessProbe.HTTPGet.Port.IntValue()), "127.0.0.1:9901"},
		"readiness host:port":    {fmt.Sprintf("%s:%d", c.ReadinessProbe.HTTPGet.Host, c.ReadinessProbe.HTTPGet.Port.IntValue()), "127.0.0.1:9901"},
		"memory limit":           {c.Resources.Limits.Memory().String(), "512Mi"},
		"nodeSelector":           {spec.NodeSelector["node-role.example.com/gateway"], "true"},
		"dnsPolicy":              {string(spec.DNSPolicy), "ClusterFirstWithHostNet"},
		"pod label":              {ds.Spec.Template.Labels["team"], "edge"},
		"pod annotation":         {ds.Spec.Template.Annotations["example.com/owner"], "edge"},
		"pull secret":            {fmt.Sprint(spec.ImagePullSecrets), "[{regcred}]"},
		"tolerations":            {fmt.Sprintf("%d %s", len(spec.Tolerations), spec.Tolerations[0].Key), "1 dedicated"},
	}
	for what, got := range checks {
		if got[0] != got[1] {
			t.Errorf("%s: %q, want %q", what, got[0], got[1])
		}
	}
	if !spec.HostNetwork {
		t.Error("hostNetwork: true did not reach the pod")
	}
	if !slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == "HTTPS_PROXY" }) {
		t.Errorf("extraEnv missing: %v", c.Env)
	}
	// The CSI socket is where kubelet looks for this driver name.
	sock := strings.TrimPrefix(flags["endpoint"], "unix://")
	if host, _ := hostPathOf(t, spec, c, sock); host != flags["kubelet-csi-endpoint"] {
		t.Errorf("the CSI socket is %s on the host, but kubelet is told %s", host, flags["kubelet-csi-endpoint"])
	}
	// Extra host mounts: read-only unless asked, at mountPath or the host path.
	wantMounts := map[string]struct {
		path, host string
		ro         bool
	}{
		"credential-providers": {"/usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec", "/usr/libexec/kubernetes/kubelet-plugins/credential-provider/exec", true},
		"containerd-certs":     {"/host/etc/containerd/certs.d", "/etc/containerd/certs.d", true},
		"scratch":              {"/var/tmp/wasm-csi", "/var/tmp/wasm-csi", false},
	}
	for name, w := range wantMounts {
		i := slices.IndexFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == name })
		if i < 0 {
			t.Errorf("extra host mount %s: no volumeMount", name)
			continue
		}
		m := c.VolumeMounts[i]
		host, _ := hostPathOf(t, spec, c, m.MountPath)
		if m.MountPath != w.path || host != w.host || m.ReadOnly != w.ro {
			t.Errorf("extra host mount %s: %s (readOnly %v) from host %s, want %s (readOnly %v) from %s", name, m.MountPath, m.ReadOnly, host, w.path, w.ro, w.host)
		}
	}
	// The config file holds the values given, and the defaults not overridden.
	var cm *corev1.ConfigMap
	for _, d := range docs {
		if d.kind() == "ConfigMap" {
			cm = decodeTyped(t, d).(*corev1.ConfigMap)
		}
	}
	var cfg struct {
		Registries struct {
			Insecure []string            `json:"insecure"`
			Mirrors  map[string][]string `json:"mirrors"`
		} `json:"registries"`
		Limits     map[string]string `json:"limits"`
		Validation string            `json:"validation"`
		PrePull    []map[string]string
	}
	if err := yaml.Unmarshal([]byte(cm.Data["config.yaml"]), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Limits["maxStoreSize"] != "4Gi" || cfg.Limits["maxModuleSize"] != "256Mi" || cfg.Validation != "proxy-wasm" ||
		len(cfg.PrePull) != 1 || cfg.Registries.Mirrors["ghcr.io"][0] != "mirror.internal:5000" {
		t.Errorf("config.yaml does not hold the values given over the defaults:\n%s", cm.Data["config.yaml"])
	}
	checkDriverAccepts(t, c)
}

// checkPodMonitor checks the keys of a prometheus-operator PodMonitor that
// scrapes the driver's metrics port.
func checkPodMonitor(t *testing.T, d doc) {
	t.Helper()
	spec := mapAt(d.obj, "spec")
	checkKeys(t, d.src+" spec", spec, "selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel")
	eps := asList(spec["podMetricsEndpoints"])
	if len(eps) != 1 {
		t.Fatalf("%s: %d podMetricsEndpoints, want 1", d, len(eps))
	}
	ep, _ := eps[0].(map[string]any)
	checkKeys(t, d.src+" podMetricsEndpoints[0]", ep, "port", "path", "interval", "relabelings", "scheme")
	if str(ep, "port") != "metrics" || str(ep, "path") != "/metrics" {
		t.Errorf("%s: scrapes port %q path %q, want the driver's metrics port and /metrics", d, str(ep, "port"), str(ep, "path"))
	}
	if sel := mapAt(spec, "selector", "matchLabels"); str(sel, "app.kubernetes.io/name") != "wasm-csi" || str(sel, "app.kubernetes.io/component") != "node" {
		t.Errorf("%s: selector %v does not select the driver's pods", d, sel)
	}
}
