package store

import (
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestVerificationState reads a verification record as node/verify.go
// writes it (node's own test writes one through its type), and the
// inventory lists it under the module its refs name.
func TestVerificationState(t *testing.T) {
	s := openStore(t, t.TempDir())
	now := time.Now()
	mod := storeModule(t, s, "signed", now.Add(-time.Hour))
	manifest := digest.FromString("manifest of signed")
	if err := s.PutRef(RefRecord{Ref: "reg.example/signed:1", Manifest: manifest, Module: mod}); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Verification(manifest); ok {
		t.Fatal("a state before any record")
	}
	at := now.UTC().Truncate(time.Second)
	rec := map[string]any{
		"manifest": manifest,
		"evidence": map[string]any{"subjects": []any{}},
		"passed": map[string]PassedPolicy{
			"fp-old": {Policy: "acme", Signer: "key old.pub", At: at.Add(-time.Hour)},
			"fp-new": {Policy: "acme", Signer: "key new.pub", At: at},
		},
	}
	if err := s.PutVerification(manifest, rec); err != nil {
		t.Fatal(err)
	}
	v, ok := s.Verification(manifest)
	if !ok || !v.SignaturesKept || len(v.Passed) != 2 {
		t.Fatalf("state %+v, %v", v, ok)
	}
	if p := v.Passed[0]; p.Fingerprint != "fp-new" || p.Signer != "key new.pub" || !p.At.Equal(at) {
		t.Errorf("most recent pass %+v", p)
	}
	// A record of another manifest under this name is not this one's.
	other := digest.FromString("other")
	if err := s.PutVerification(other, map[string]any{"manifest": manifest}); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Verification(other); ok {
		t.Error("a record naming another manifest was read")
	}
	inv, err := s.Inventory(GCPolicy{}, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(inv.Modules) != 1 || len(inv.Modules[0].Verification) != 1 || inv.Modules[0].Verification[0].Manifest != manifest {
		t.Errorf("inventory %+v", inv.Modules)
	}
}
