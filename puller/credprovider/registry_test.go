package credprovider

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// A real distribution registry with basic auth that only the plugin's
// credentials open.

type memSink struct{ bytes.Buffer }

func (s *memSink) Reset() error { s.Buffer.Reset(); return nil }

const (
	regUser = "plugin-user"
	regPass = "Pl4gin-0nly-Pa55"
)

func privateRegistry(t *testing.T) (*registrytest.Registry, puller.Reference, []byte) {
	t.Helper()
	if _, err := os.Stat(filepath.Join("..", "..", "bin", "registry")); err != nil && os.Getenv(registrytest.EnvRegistryBinary) == "" {
		t.Skip("no registry binary: run make tools")
	}
	reg := registrytest.StartT(t, registrytest.Options{Htpasswd: map[string]string{regUser: regPass}})
	mod := registrytest.Module(t.Name(), 4096)
	if _, err := registrytest.PushWasm(context.Background(), reg.Host()+"/private/filter:1.0", mod, registrytest.LayoutCNCF,
		registrytest.WithBasicAuth(regUser, regPass)); err != nil {
		t.Fatal(err)
	}
	return reg, ref(t, reg.ProxyHost()+"/private/filter:1.0"), mod
}

// pull resolves ref with the puller's attempts and pulls it.
func pull(p *puller.Puller, r puller.Reference, keyrings ...*puller.Keyring) ([]byte, puller.Credential, error) {
	ctx := context.Background()
	attempts, err := p.Attempts(ctx, r, keyrings...)
	if err != nil {
		return nil, puller.Credential{}, err
	}
	desc, cred, err := p.ResolveWith(ctx, r, attempts)
	if err != nil {
		return nil, puller.Credential{}, err
	}
	var sink memSink
	if _, err := p.Pull(ctx, r, desc, &sink, cred); err != nil {
		return nil, cred, err
	}
	return sink.Bytes(), cred, nil
}

func dockerConfig(host, user, pass string) []byte {
	a := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	return []byte(fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, host, a))
}

func TestPluginCredentialsOpenThePrivateRegistry(t *testing.T) {
	_, r, mod := privateRegistry(t)
	e := newEnv(t, "acme-plugin")
	host := r.Registry

	// Without the plugin, the registry refuses the pull.
	p := puller.New(puller.Config{InsecureRegistries: []string{host}})
	if _, _, err := pull(p, r); !errors.Is(err, errdefs.ErrUnauthorized) {
		t.Fatalf("without the plugin: %v, want Unauthorized", err)
	}

	// With it, the plugin's credentials open it, and they are the node's.
	ps := e.load(config(provider("acme-plugin", v1, "5m", []string{host},
		"-user="+regUser, "-password="+regPass, "-log="+e.log)), Options{})
	p = puller.New(puller.Config{InsecureRegistries: []string{host}, CredentialProvider: ps})
	got, cred, err := pull(p, r)
	if err != nil {
		t.Fatalf("with the plugin: %v", err)
	}
	if !bytes.Equal(got, mod) {
		t.Fatal("pulled bytes differ from the module")
	}
	if cred.Source != "credential provider acme-plugin" || cred.FromPodSecret() {
		t.Errorf("pulled with %+v, want the node's plugin credential", cred)
	}
	if want := v1 + " " + host + "/private/filter\n"; readFile(t, e.log) != want {
		t.Errorf("plugin asked %q, want %q", readFile(t, e.log), want)
	}
}

// Order: the pod's secrets, then the plugin, then --docker-config. Each
// source with a wrong password is tried and named; the first that works is
// used.
func TestCredentialOrder(t *testing.T) {
	_, r, _ := privateRegistry(t)
	host := r.Registry
	nodeFile := filepath.Join(t.TempDir(), "config.json")
	writeFile(t, nodeFile, dockerConfig(host, regUser, "wr0ng-node-Pa55"))
	wrongSecret, err := puller.ParseDockerConfigJSON("secret team-a/wrong", dockerConfig(host, regUser, "wr0ng-pod-Pa55"))
	if err != nil {
		t.Fatal(err)
	}
	goodSecret, err := puller.ParseDockerConfigJSON("secret team-a/good", dockerConfig(host, regUser, regPass))
	if err != nil {
		t.Fatal(err)
	}

	load := func(pluginPass string) *puller.Puller {
		e := newEnv(t, "acme-plugin")
		ps := e.load(config(provider("acme-plugin", v1, "5m", []string{host}, "-user="+regUser, "-password="+pluginPass)), Options{})
		return puller.New(puller.Config{InsecureRegistries: []string{host}, CredentialProvider: ps, DockerConfig: nodeFile})
	}

	p := load(regPass)
	attempts, err := p.Attempts(context.Background(), r, wrongSecret)
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, a := range attempts {
		order = append(order, a.Source)
	}
	if got, want := strings.Join(order, ", "), "secret team-a/wrong, credential provider acme-plugin, node --docker-config"; got != want {
		t.Errorf("attempts %s, want %s", got, want)
	}
	// The wrong secret is refused, the plugin's credential works.
	if _, cred, err := pull(p, r, wrongSecret); err != nil || cred.Source != "credential provider acme-plugin" {
		t.Fatalf("pulled with %+v: %v", cred, err)
	}
	// A pod's secret that works comes first: its pull is the pod's.
	if _, cred, err := pull(p, r, goodSecret); err != nil || cred.Source != "secret team-a/good" || !cred.FromPodSecret() {
		t.Fatalf("pulled with %+v: %v", cred, err)
	}
	// A plugin whose credential is refused: PermissionDenied naming every
	// source, in order, and no password.
	p = load("wr0ng-plugin-Pa55")
	_, _, err = pull(p, r, wrongSecret)
	if !errors.Is(err, errdefs.ErrUnauthorized) {
		t.Fatalf("all refused: %v, want Unauthorized", err)
	}
	if !strings.Contains(err.Error(), "(secret team-a/wrong, credential provider acme-plugin, node --docker-config)") {
		t.Errorf("the error does not list the sources in order: %v", err)
	}
	for _, s := range []string{"wr0ng-plugin-Pa55", "wr0ng-pod-Pa55", "wr0ng-node-Pa55", regPass} {
		if strings.Contains(err.Error(), s) {
			t.Errorf("the error holds a password: %v", err)
		}
	}
}

// A plugin that fails leaves the other sources to be tried; when they are
// refused too, the failure is the error: Unavailable, naming the plugin.
// A public image is pulled anonymously, as kubelet pulls it.
func TestFailingPlugin(t *testing.T) {
	_, r, _ := privateRegistry(t)
	host := r.Registry
	public := registrytest.StartT(t, registrytest.Options{})
	mod := registrytest.Module("public", 4096)
	if _, err := registrytest.PushWasm(context.Background(), public.Host()+"/public/filter:1.0", mod, registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	pub := ref(t, public.ProxyHost()+"/public/filter:1.0")
	e := newEnv(t, "acme-plugin")
	ps := e.load(config(provider("acme-plugin", v1, "5m", []string{host, pub.Registry}, "-mode=garbage", "-password="+regPass)), Options{})
	p := puller.New(puller.Config{InsecureRegistries: []string{host, pub.Registry}, CredentialProvider: ps})
	if got, cred, err := pull(p, pub); err != nil || !bytes.Equal(got, mod) || cred.Source != "anonymous" {
		t.Fatalf("public image with a failing plugin: %+v %v", cred, err)
	}
	_, _, err := pull(p, r)
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("%v, want Unavailable", err)
	}
	for _, want := range []string{r.Original, "credential provider plugin acme-plugin gave no credential: its stdout is not a JSON object",
		host + " refused every other credential tried (anonymous)", "fix the plugin"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
	if strings.Contains(err.Error(), regPass) {
		t.Errorf("the error holds the plugin's output: %v", err)
	}
	// A node --docker-config that works still serves.
	nodeFile := filepath.Join(t.TempDir(), "config.json")
	writeFile(t, nodeFile, dockerConfig(host, regUser, regPass))
	p = puller.New(puller.Config{InsecureRegistries: []string{host}, CredentialProvider: ps, DockerConfig: nodeFile})
	if _, cred, err := pull(p, r); err != nil || cred.Source != "node --docker-config" {
		t.Fatalf("with --docker-config: %+v %v", cred, err)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func writeFile(t *testing.T, p string, b []byte) {
	t.Helper()
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
