package node

import (
	"context"
	"errors"
	"testing"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/imagematch"
)

// TestRefusedConfigPatternReachesPublishAsCause: imagematch.ErrInvalidPattern
// is a config-loading error (csi's notFromCalls exempts it from codeOf). The
// one way it reaches a CSI call is a config file refused at start: the
// publish then fails with ErrConfigInvalid, whose cause it is, so csi maps
// the kind, never the pattern error.
func TestRefusedConfigPatternReachesPublishAsCause(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	bad := []string{"ghcr.io/acme*"}
	err := e.svc.ApplyConfigFile(config.FileConfig{Registries: config.RegistriesConfig{Allowed: &bad}})
	if !errors.Is(err, imagematch.ErrInvalidPattern) {
		t.Fatalf("applying registries.allowed %q: %v, want imagematch.ErrInvalidPattern", bad, err)
	}
	e.svc.ConfigRefused(err) // what config.Watcher does with it
	err = e.svc.Publish(context.Background(), e.request(t, "vol-1", "ghcr.io/acme/filter:1", "pod-1", PullIfNotPresent))
	var ne *errdefs.Error
	if !errors.As(err, &ne) || ne.Kind != errdefs.ErrConfigInvalid {
		t.Fatalf("publish with the config refused at start: %v, want an *errdefs.Error of kind ErrConfigInvalid", err)
	}
	if !errors.Is(ne.Cause, imagematch.ErrInvalidPattern) {
		t.Errorf("the refusal's cause %v does not carry the pattern error", ne.Cause)
	}
}
