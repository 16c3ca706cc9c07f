package inspect

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller/verify"
)

func inventory(now time.Time) store.Inventory {
	mod := digest.FromString("module")
	return store.Inventory{Root: "/var/lib/wasm-csi", Format: 1, StoreBytes: 1234,
		Modules: []store.ModuleInfo{{Digest: mod, Size: 1234, LastUsed: now.Add(-time.Hour),
			Refs: []store.RefRecord{{Ref: "reg.example/a:1", Manifest: digest.FromString("manifest"), Module: mod}},
			Verification: []store.VerificationState{{Manifest: digest.FromString("manifest"), SignaturesKept: true,
				Passed: []store.PassedPolicy{{Policy: "acme-release", Signer: "key acme.pub", At: now.Add(-time.Hour)}}}}}},
		GCNext: []digest.Digest{mod},
		Pulls: []store.PullInFlight{{PullRecord: store.PullRecord{Image: "reg.example/big:2", Manifest: digest.FromString("big"),
			Total: 64 << 20, Started: now.Add(-42 * time.Second)}, Written: 12 << 20, LastWrite: now.Add(-time.Second)}},
	}
}

func TestTable(t *testing.T) {
	now := time.Now()
	var out bytes.Buffer
	if err := Write(&out, inventory(now), "table", now, Options{}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(out.String(), "\n")
	var pull, module string
	for i, l := range lines {
		if strings.HasPrefix(l, "PULL IN FLIGHT") && i+1 < len(lines) {
			pull = lines[i+1]
		}
		if strings.HasPrefix(l, "MODULE") && i+1 < len(lines) {
			module = lines[i+1]
		}
	}
	if !strings.Contains(module, " acme-release ") {
		t.Errorf("module line %q does not name the policy it passed", module)
	}
	for _, want := range []string{"reg.example/big:2", "12582912", "67108864", "42s ago", "1s ago"} {
		if !strings.Contains(pull, want) {
			t.Errorf("pull line %q lacks %q\n%s", pull, want, out.String())
		}
	}
}

func TestJSON(t *testing.T) {
	now := time.Now()
	var out bytes.Buffer
	if err := Write(&out, inventory(now), "json", now, Options{}); err != nil {
		t.Fatal(err)
	}
	var back store.Inventory
	if err := json.Unmarshal(out.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Pulls) != 1 || back.Pulls[0].Written != 12<<20 || back.Pulls[0].Total != 64<<20 || back.Pulls[0].Image != "reg.example/big:2" {
		t.Errorf("pulls read back %+v", back.Pulls)
	}
	if v := back.Modules[0].Verification; len(v) != 1 || len(v[0].Passed) != 1 || v[0].Passed[0].Signer != "key acme.pub" {
		t.Errorf("verification read back %+v", v)
	}
	if err := Write(&out, inventory(now), "yaml", now, Options{}); err == nil {
		t.Error("-o yaml accepted")
	}
}

func TestVerified(t *testing.T) {
	m := digest.FromString("m")
	for _, c := range []struct {
		vs   []store.VerificationState
		want string
	}{
		{nil, "-"},
		{[]store.VerificationState{{Manifest: m, Passed: []store.PassedPolicy{}}}, "no"},
		{[]store.VerificationState{{Manifest: m, Passed: []store.PassedPolicy{{Policy: "b"}, {Policy: "a"}, {Policy: "b"}}}}, "b,a"},
	} {
		if got := verified(store.ModuleInfo{Verification: c.vs}, nil); got != c.want {
			t.Errorf("verified(%+v) = %q, want %q", c.vs, got, c.want)
		}
	}
}

func policies(t *testing.T, unmatched string, keyPEM string) *verify.Policies {
	t.Helper()
	fc, err := config.ParseFileConfig([]byte(`verification:
  unmatched: ` + unmatched + `
  policies:
  - name: acme
    images: [reg.example/acme]
    cosign:
      ignoreTlog: true
      keys:
      - pem: |
` + indent(keyPEM, "          ")))
	if err != nil {
		t.Fatal(err)
	}
	ps, err := fc.VerificationPolicies()
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func indent(s, prefix string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(prefix + l + "\n")
	}
	return b.String()
}

func publicKeyPEM(t *testing.T) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

// TestVerifiedAgainstPolicies: with the config's policies, the table says
// whether a module passed the policy its image matches as it is now.
func TestVerifiedAgainstPolicies(t *testing.T) {
	ps := policies(t, "allow", publicKeyPEM(t))
	current := ps.Match("reg.example", "acme/filter").Fingerprint
	m := digest.FromString("manifest")
	module := func(ref string, passed ...string) store.ModuleInfo {
		mi := store.ModuleInfo{Refs: []store.RefRecord{{Ref: ref, Manifest: m}}}
		if passed != nil {
			v := store.VerificationState{Manifest: m, Passed: []store.PassedPolicy{}}
			for _, fp := range passed {
				v.Passed = append(v.Passed, store.PassedPolicy{Policy: "acme", Fingerprint: fp})
			}
			mi.Verification = []store.VerificationState{v}
		}
		return mi
	}
	for _, c := range []struct {
		m    store.ModuleInfo
		ps   *verify.Policies
		want string
	}{
		{module("reg.example/acme/filter:1", current), ps, "acme"},
		{module("reg.example/acme/filter:1", "an earlier fingerprint"), ps, "acme (re-check)"},
		{module("reg.example/acme/filter:1"), ps, "acme (no)"},
		{module("reg.example/other/filter:1"), ps, "-"},
		{module("reg.example/other/filter:1"), policies(t, "deny", publicKeyPEM(t)), "denied"},
	} {
		if got := verified(c.m, c.ps); got != c.want {
			t.Errorf("%s passed %+v: %q, want %q", c.m.Refs[0].Ref, c.m.Verification, got, c.want)
		}
	}
}
