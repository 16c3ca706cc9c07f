package node

import (
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller/verify"
)

// TestVerifyRecordReadByInspect: what the node records of a manifest's
// signatures is what store.Verification (inspect) reads back.
func TestVerifyRecordReadByInspect(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	m := digest.FromString("manifest")
	at := time.Now().UTC().Truncate(time.Second)
	if err := e.svc.writeVerifyRecord(verifyRecord{Manifest: m, Evidence: &verify.Evidence{},
		Passed: map[string]store.PassedPolicy{"fp": {Policy: "acme", Signer: "key acme.pub", At: at}}}); err != nil {
		t.Fatal(err)
	}
	v, ok := e.svc.store.Verification(m)
	if !ok || !v.SignaturesKept || len(v.Passed) != 1 {
		t.Fatalf("read back %+v, %v", v, ok)
	}
	if p := v.Passed[0]; p.Policy != "acme" || p.Signer != "key acme.pub" || !p.At.Equal(at) || p.Fingerprint != "fp" {
		t.Errorf("read back %+v", p)
	}
}
