package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// Kubelet credential provider plugins through the daemon: a registry with
// basic auth that only the plugin's credentials open, the plugin a real
// executable (test/tools/credplugin) in --image-credential-provider-bin-dir.

const pluginName = "acme-credential-provider"

var (
	pluginOnce sync.Once
	pluginBin  string
	pluginErr  error
)

// pluginSetup is a bin dir holding the plugin, and a config for it.
type pluginSetup struct {
	binDir, config, runs string
}

// newPluginSetup writes a CredentialProviderConfig whose one provider
// matches images and runs the plugin with args.
func newPluginSetup(t *testing.T, matchImages []string, extra string, args ...string) pluginSetup {
	t.Helper()
	dir := t.TempDir()
	s := pluginSetup{binDir: filepath.Join(dir, "bin"), config: filepath.Join(dir, "credential-providers.yaml"), runs: filepath.Join(dir, "runs.log")}
	if err := os.Mkdir(s.binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	pluginOnce.Do(func() {
		// Built once, beside the driver, in the suite's directory.
		pluginBin, pluginErr = harness.BuildCredentialPlugin(filepath.Dir(driverBin))
	})
	if pluginErr != nil {
		t.Fatal(pluginErr)
	}
	if err := os.Symlink(pluginBin, filepath.Join(s.binDir, pluginName)); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: %s\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n  defaultCacheDuration: 5m\n  matchImages:\n", pluginName)
	for _, m := range matchImages {
		fmt.Fprintf(&b, "  - %q\n", m)
	}
	b.WriteString("  args:\n")
	for _, a := range append([]string{"-log=" + s.runs}, args...) {
		fmt.Fprintf(&b, "  - %q\n", a)
	}
	b.WriteString(extra)
	if err := os.WriteFile(s.config, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s pluginSetup) flags() []string {
	return []string{"--image-credential-provider-config=" + s.config, "--image-credential-provider-bin-dir=" + s.binDir}
}

func (s pluginSetup) runCount(t *testing.T) int {
	b, err := os.ReadFile(s.runs)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return bytes.Count(b, []byte("\n"))
}

func TestCredentialProviderPlugin(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	const user, pass = "node-identity", "Pl4gin-0nly-t0ken"
	private := registrytest.StartT(t, registrytest.Options{Htpasswd: map[string]string{user: pass}})
	mod := module(t, "1")
	if _, err := registrytest.PushWasm(context.Background(), private.Host()+"/private/filter:1.0", mod, registrytest.LayoutCNCF,
		registrytest.WithBasicAuth(user, pass)); err != nil {
		t.Fatal(err)
	}
	host := private.ProxyHost()
	img := host + "/private/filter:1.0"
	insecure := "--insecure-registry=" + host

	t.Run("opens-the-registry", func(t *testing.T) {
		s := newPluginSetup(t, []string{host}, "", "-user="+user, "-password="+pass, "-cache-key-type=Registry")
		private.ResetCounts()
		e := newEnvOpts(t, harness.DaemonOptions{Args: append([]string{insecure}, s.flags()...)})
		// Ten pods publish the image at once: one plugin run, one download.
		const pods = 10
		errs := make([]error, pods)
		var wg sync.WaitGroup
		for i := range pods {
			req := e.request(harness.NewPod(fmt.Sprintf("gw-%d", i)), "filter", map[string]string{"image": img})
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = e.publish(req)
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("pod %d: %v", i, err)
			}
		}
		if n := s.runCount(t); n != 1 {
			t.Errorf("%d concurrent publishes ran the plugin %d times, want 1", pods, n)
		}
		if n := private.BlobGets(digest.FromBytes(mod)); n != 1 {
			t.Errorf("module downloaded %d times, want 1", n)
		}
		// The module is the node's, as with kubelet: a new pod is served
		// from the store without asking the registry about its access.
		before := private.ManifestGets() + private.ManifestHeads()
		req := e.mustPublish(img, nil)
		checkFile(t, req, "plugin.wasm", mod)
		if n := private.ManifestGets() + private.ManifestHeads() - before; n != 0 {
			t.Errorf("a module pulled with the node's plugin credentials was re-checked for a new pod: %d manifest requests", n)
		}
		// Another repository of the same registry: the Registry-keyed
		// answer is reused, the plugin is not run again.
		mod2 := module(t, "2")
		if _, err := registrytest.PushWasm(context.Background(), private.Host()+"/private/other:1.0", mod2, registrytest.LayoutCNCF,
			registrytest.WithBasicAuth(user, pass)); err != nil {
			t.Fatal(err)
		}
		checkFile(t, e.mustPublish(host+"/private/other:1.0", nil), "plugin.wasm", mod2)
		if n := s.runCount(t); n != 1 {
			t.Errorf("plugin ran %d times for two repositories of one registry with cacheKeyType Registry, want 1", n)
		}
		if strings.Contains(e.d.Logs(), pass) {
			t.Error("the daemon logged the plugin's password")
		}
		if n := metric(t, scrape(t, e.d), `wasmcsi_credential_provider_runs_total{plugin="`+pluginName+`",result="success"}`); n != 1 {
			t.Errorf("runs_total says %v successful runs, want 1", n)
		}
	})

	t.Run("before-docker-config", func(t *testing.T) {
		// The plugin's credential is wrong, --docker-config's is right:
		// both are tried, the plugin first.
		s := newPluginSetup(t, []string{host}, "", "-user="+user, "-password=wr0ng-plugin-Pa55")
		cfg := dockerConfig(t, host, user, pass)
		e := newEnvOpts(t, harness.DaemonOptions{Args: append([]string{insecure, "--docker-config=" + cfg}, s.flags()...)})
		checkFile(t, e.mustPublish(img, nil), "plugin.wasm", mod)
		if n := s.runCount(t); n != 1 {
			t.Errorf("plugin ran %d times, want 1", n)
		}
		// Both wrong: PermissionDenied naming the sources in order.
		wrong := dockerConfig(t, host, user, "wr0ng-node-Pa55")
		e = newEnvOpts(t, harness.DaemonOptions{Args: append([]string{insecure, "--docker-config=" + wrong}, s.flags()...)})
		err := e.publish(e.request(harness.NewPod("denied"), "filter", map[string]string{"image": img}))
		wantCode(t, err, codes.PermissionDenied, img, "(credential provider "+pluginName+", node --docker-config)")
		for _, secret := range []string{pass, "wr0ng-plugin-Pa55", "wr0ng-node-Pa55"} {
			if strings.Contains(err.Error(), secret) {
				t.Errorf("the refusal holds a password: %v", err)
			}
		}
	})

	for _, c := range []struct{ mode, says string }{
		{"fail", "it failed (exit status 3)"},
		{"garbage", "its stdout is not a JSON object"},
		{"unknown-field", "does not decode"},
	} {
		t.Run("plugin-"+c.mode, func(t *testing.T) {
			s := newPluginSetup(t, []string{host}, "", "-mode="+c.mode, "-user="+user, "-password="+pass)
			e := newEnvOpts(t, harness.DaemonOptions{Args: append([]string{insecure}, s.flags()...)})
			req := e.request(harness.NewPod("broken-plugin"), "filter", map[string]string{"image": img})
			err := e.publish(req)
			wantCode(t, err, codes.Unavailable, img, "credential provider plugin "+pluginName, c.says)
			if strings.Contains(err.Error(), pass) || strings.Contains(e.d.Logs(), pass) {
				t.Errorf("the plugin's output reached the message or the log: %v", err)
			}
			checkGone(t, req.TargetPath)
			if n := metric(t, scrape(t, e.d), `wasmcsi_credential_provider_runs_total{plugin="`+pluginName+`",result="error"}`); n != 1 {
				t.Errorf("runs_total says %v failed runs, want 1", n)
			}
		})
	}
}

// A config the driver cannot apply stops it at start, as it stops kubelet,
// with a message naming the file and what is wrong.
func TestCredentialProviderConfigRefused(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	tokenMode := "  tokenAttributes:\n    serviceAccountTokenAudience: sts.amazonaws.com\n    cacheType: ServiceAccount\n    requireServiceAccount: true\n"
	for _, c := range []struct {
		name  string
		setup func(t *testing.T) []string
		says  []string
	}{
		{"tokenAttributes", func(t *testing.T) []string {
			return newPluginSetup(t, []string{"*.dkr.ecr.*.amazonaws.com"}, tokenMode).flags()
		}, []string{"credential-providers.yaml", pluginName, "tokenAttributes (service-account-token mode, KEP-4412) is not supported"}},
		{"missing-binary", func(t *testing.T) []string {
			s := newPluginSetup(t, []string{"registry.example.com"}, "")
			if err := os.Remove(filepath.Join(s.binDir, pluginName)); err != nil {
				t.Fatal(err)
			}
			return s.flags()
		}, []string{"credential-providers.yaml", pluginName, "no executable"}},
		{"config-without-bin-dir", func(t *testing.T) []string {
			return newPluginSetup(t, []string{"registry.example.com"}, "").flags()[:1]
		}, []string{"--image-credential-provider-config and --image-credential-provider-bin-dir go together"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			args := append([]string{"--node-id=n", "--endpoint=unix://" + filepath.Join(dir, "csi.sock"), "--root-dir=" + filepath.Join(dir, "root"),
				"--metrics-address=127.0.0.1:0"}, c.setup(t)...)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, err := exec.CommandContext(ctx, driverBin, args...).CombinedOutput()
			if err == nil {
				t.Fatalf("the driver ran with a config it cannot apply:\n%s", out)
			}
			if ctx.Err() != nil {
				t.Fatalf("the driver did not stop:\n%s", out)
			}
			for _, s := range c.says {
				if !strings.Contains(string(out), s) {
					t.Errorf("the driver's output does not say %q:\n%s", s, out)
				}
			}
		})
	}
}
