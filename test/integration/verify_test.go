package integration

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/signtest"
)

// keyPolicy is a verification section trusting kp for images under repo.
func keyPolicy(repo, mode, unmatched string, kp signtest.KeyPair) string {
	return fmt.Sprintf(`verification:
  unmatched: %s
  policies:
  - name: acme-release
    images: [%q]
    mode: %s
    cosign:
      ignoreTlog: true
      keys:
      - pem: |
%s`, unmatched, reg.ProxyHost()+"/"+repo, mode, indent(kp.PublicPEM, "          "))
}

func indent(s, prefix string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(prefix + l + "\n")
	}
	return b.String()
}

// TestVerification publishes through the daemon with a policy in its config
// file: a module signed with the cosign CLI is served, an unsigned one is
// refused before it is stored; a republish and a restart ask the registry
// nothing; a policy swapped live refuses the stored module to a new pod
// without the registry while the running pod keeps its file; warn mode
// serves; unmatched: deny refuses images no policy covers.
func TestVerification(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	kp := signtest.GenerateKeyPair(t)
	other := signtest.GenerateKeyPair(t)
	repo := repoName(t, "filters")
	signedMod, unsignedMod := module(t, "signed"), module(t, "unsigned")
	signed := push(t, repo+"/signed:1", signedMod, registrytest.LayoutCNCF)
	push(t, repo+"/unsigned:1", unsignedMod, registrytest.LayoutCNCF)
	signtest.SignKey(t, kp, reg.Host()+"/"+repo+"/signed@"+signed.Digest.String(), false)

	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfgPath, keyPolicy(repo, "enforce", "allow", kp))
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.ProxyHost(), "--config=" + cfgPath}})

	// Signed: served.
	running := e.mustPublish(image(repo+"/signed:1"), nil)
	checkFile(t, running, "plugin.wasm", signedMod)
	// inspect, beside the daemon, shows the policy it passed.
	if v := inspectVerification(t, e.d, image(repo+"/signed:1")); len(v) != 1 || len(v[0].Passed) != 1 ||
		v[0].Passed[0].Policy != "acme-release" || v[0].Manifest != signed.Digest || !v[0].SignaturesKept {
		t.Errorf("inspect shows the signed module's verification as %+v", v)
	}

	// Unsigned: refused, naming the image, digest and policy; not stored.
	before := e.storedBlobs()
	err := e.publish(e.request(harness.NewPod("unsigned"), "wasm", map[string]string{"image": image(repo + "/unsigned:1")}))
	wantCode(t, err, codes.FailedPrecondition, repo+"/unsigned", "sha256:", "acme-release", "no signature")
	if after := e.storedBlobs(); len(after) != len(before) {
		t.Fatalf("a refused module was stored: %v -> %v", before, after)
	}
	text := scrape(t, e.d)
	if metric(t, text, `wasmcsi_verifications_total{result="refused"}`) != 1 || metric(t, text, `wasmcsi_verifications_total{result="verified"}`) != 1 {
		t.Errorf("verifications_total does not count one verified and one refused:\n%s", text)
	}

	// A republish and a restart ask the registry nothing.
	// The registry is shared with tests running in parallel: count only
	// this image's manifest, signature and blob requests.
	signedBlob := digest.FromBytes(signedMod)
	ownRequests := func() int {
		return reg.ManifestRequests(repo+"/signed") + reg.Counts().BlobGets[signedBlob] + reg.Counts().BlobHeads[signedBlob]
	}
	start := ownRequests()
	e.mustUnpublish(e.mustPublish(image(repo+"/signed:1"), nil))
	e.d.Stop()
	if err := e.d.Start(); err != nil {
		t.Fatal(err)
	}
	e.mustUnpublish(e.mustPublish(image(repo+"/signed:1"), nil))
	if n := ownRequests() - start; n != 0 {
		t.Fatalf("a verified module cost %d registry requests on republish and restart: %+v", n, reg.Counts())
	}

	// The policy now trusts another key: the stored module is refused to a
	// new pod, checked from the kept signatures (no registry request);
	// the running pod keeps its file.
	writeConfig(t, cfgPath, keyPolicy(repo, "enforce", "allow", other))
	eventually(t, "the new policy", func() bool {
		err := e.publish(e.request(harness.NewPod("after-swap"), "wasm", map[string]string{"image": image(repo + "/signed:1")}))
		return err != nil && strings.Contains(err.Error(), "not signed by any of the policy's keys")
	})
	if n := ownRequests() - start; n != 0 {
		t.Fatalf("re-checking a stored module after a policy change cost %d registry requests", n)
	}
	checkFile(t, running, "plugin.wasm", signedMod)
	// inspect, given the daemon's config, says the stored module passed
	// only the earlier version of the policy.
	if row := inspectRow(t, e.d, cfgPath, image(repo+"/signed:1")); !strings.Contains(row, " acme-release (re-check) ") {
		t.Errorf("inspect after the policy swap: %q, want acme-release (re-check)", row)
	}

	// Warn mode: served.
	writeConfig(t, cfgPath, keyPolicy(repo, "warn", "allow", other))
	eventually(t, "warn mode", func() bool {
		return e.publish(e.request(harness.NewPod("warned"), "wasm", map[string]string{"image": image(repo + "/unsigned:1")})) == nil
	})
	if metric(t, scrape(t, e.d), `wasmcsi_verifications_total{result="warned"}`) < 1 {
		t.Error("warn mode served without counting it")
	}

	// unmatched: deny refuses an image no policy covers.
	push(t, repoName(t, "elsewhere")+":1", module(t, "elsewhere"), registrytest.LayoutCNCF)
	writeConfig(t, cfgPath, keyPolicy(repo, "enforce", "deny", kp))
	eventually(t, "unmatched: deny", func() bool {
		err := e.publish(e.request(harness.NewPod("unmatched"), "wasm", map[string]string{"image": image(repoName(t, "elsewhere") + ":1")}))
		return err != nil && strings.Contains(err.Error(), "no verification policy matches")
	})
	// And the first policy still serves its signed module.
	e.mustPublish(image(repo+"/signed:1"), nil)
}

// inspectVerification returns the verification state `wasm-csi-driver
// inspect -o json` shows for the module ref names in the daemon's store.
func inspectVerification(t *testing.T, d *harness.Daemon, ref string) []store.VerificationState {
	t.Helper()
	inv := d.Inventory(t)
	for _, m := range inv.Modules {
		for _, r := range m.Refs {
			if r.Ref == ref {
				return m.Verification
			}
		}
	}
	t.Fatalf("inspect lists no module for %s: %+v", ref, inv.Modules)
	return nil
}

// inspectRow runs `wasm-csi-driver inspect` (a table) on the daemon's store
// with config and returns the module row naming ref.
func inspectRow(t *testing.T, d *harness.Daemon, config, ref string) string {
	t.Helper()
	out, err := exec.Command(d.Bin, "inspect", "--root-dir="+d.Root, "--config="+config).Output()
	if err != nil {
		t.Fatalf("inspect: %v", err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "sha256:") && strings.Contains(l, ref) {
			return l
		}
	}
	t.Fatalf("inspect lists no module for %s:\n%s", ref, out)
	return ""
}
