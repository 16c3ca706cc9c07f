package main

import (
	"runtime/debug"
	"testing"
)

// The image is FROM scratch (no CA bundle on disk), so the binary must carry
// root certificates of its own to reach HTTPS registries.
func TestLinksFallbackRoots(t *testing.T) {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		t.Fatal("no build info")
	}
	for _, m := range info.Deps {
		if m.Path == "golang.org/x/crypto/x509roots/fallback" {
			return
		}
	}
	t.Fatal("golang.org/x/crypto/x509roots/fallback is not linked: the scratch image could not verify any registry's certificate")
}
