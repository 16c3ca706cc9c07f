package manifests

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// blockHeader starts a cloud's commented block in the DaemonSet ("# EKS",
// "# GKE (auth-provider-gcp):"); commentedItem is one of its lines.
var (
	blockHeader   = regexp.MustCompile(`^\s*# (EKS|GKE|AKS)\b`)
	commentedItem = regexp.MustCompile(`^(\s*)# (- .*)$`)
)

// uncomment returns the DaemonSet with cloud's commented credential
// provider lines (args, mounts, volumes) made real, as a user would.
func uncomment(manifest, cloud string) string {
	var out []string
	cur := ""
	for _, line := range strings.Split(manifest, "\n") {
		if m := blockHeader.FindStringSubmatch(line); m != nil {
			cur = m[1]
			out = append(out, line)
			continue
		}
		if m := commentedItem.FindStringSubmatch(line); m != nil && cur == cloud &&
			(strings.Contains(line, "{name:") || strings.Contains(line, "--image-credential-provider")) {
			out = append(out, m[1]+m[2])
			continue
		}
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			cur = ""
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}

// The DaemonSet's commented credential provider blocks, uncommented one
// cloud at a time, are a valid DaemonSet whose args the driver accepts, and
// whose two flags name host paths mounted read-only at the same paths.
func TestDaemonSetCredentialProviderExamples(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repoRoot(t), baseDir, "base", "daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, cloud := range []string{"EKS", "GKE", "AKS"} {
		t.Run(cloud, func(t *testing.T) {
			doc := uncomment(string(raw), cloud)
			if doc == string(raw) {
				t.Fatalf("no commented %s block in the DaemonSet", cloud)
			}
			ds := &appsv1.DaemonSet{}
			if err := yaml.UnmarshalStrict([]byte(doc), ds); err != nil {
				t.Fatalf("the DaemonSet with the %s block uncommented does not decode: %v", cloud, err)
			}
			spec := ds.Spec.Template.Spec
			c := driverContainer(t, ds)
			flags := parseArgs(t, c.Args)
			for _, f := range []string{"image-credential-provider-config", "image-credential-provider-bin-dir"} {
				p := flags[f]
				if p == "" {
					t.Fatalf("no --%s in the %s block", f, cloud)
				}
				// The config's args and env name host paths: the plugin's
				// files must be where they are on the host.
				host, _ := hostPathOf(t, spec, c, p)
				if host != p {
					t.Errorf("--%s=%s is %s on the host; mount it at the same path", f, p, host)
				}
			}
			for _, m := range c.VolumeMounts {
				if strings.HasPrefix(m.Name, "credential-provider") || m.Name == "host-ca" || m.Name == "azure-json" {
					if !m.ReadOnly {
						t.Errorf("mount %s is not read-only", m.Name)
					}
				}
			}
			checkDriverAccepts(t, c)
		})
	}
}
