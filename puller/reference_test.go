package puller

import (
	"errors"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

const (
	hexA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	hexB = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
)

func TestParseReference(t *testing.T) {
	tests := []struct {
		in                   string
		registry, repository string
		tag                  string
		digest               digest.Digest
		str, name            string
		latest               bool
	}{
		{
			in:       "ghcr.io/acme/filters/header:1.2.0",
			registry: "ghcr.io", repository: "acme/filters/header", tag: "1.2.0",
			str: "ghcr.io/acme/filters/header:1.2.0", name: "ghcr.io/acme/filters/header",
		},
		{
			in:       "ghcr.io/acme/header@sha256:" + hexA,
			registry: "ghcr.io", repository: "acme/header", digest: "sha256:" + hexA,
			str: "ghcr.io/acme/header@sha256:" + hexA, name: "ghcr.io/acme/header",
		},
		{
			// tag and digest: the digest wins, the tag is dropped
			in:       "ghcr.io/acme/header:1.0@sha256:" + hexB,
			registry: "ghcr.io", repository: "acme/header", digest: "sha256:" + hexB,
			str: "ghcr.io/acme/header@sha256:" + hexB, name: "ghcr.io/acme/header",
		},
		{
			// :latest with a digest is not "latest"
			in:       "ghcr.io/acme/header:latest@sha256:" + hexB,
			registry: "ghcr.io", repository: "acme/header", digest: "sha256:" + hexB,
			str: "ghcr.io/acme/header@sha256:" + hexB, name: "ghcr.io/acme/header",
		},
		{
			in:       "oci://ghcr.io/acme/header:2",
			registry: "ghcr.io", repository: "acme/header", tag: "2",
			str: "ghcr.io/acme/header:2", name: "ghcr.io/acme/header",
		},
		{
			in:       "oci://registry.local:5000/a/b@sha256:" + hexA,
			registry: "registry.local:5000", repository: "a/b", digest: "sha256:" + hexA,
			str: "registry.local:5000/a/b@sha256:" + hexA, name: "registry.local:5000/a/b",
		},
		{
			in:       "registry.local:5000/a/b/c:v1.0-rc.1",
			registry: "registry.local:5000", repository: "a/b/c", tag: "v1.0-rc.1",
			str: "registry.local:5000/a/b/c:v1.0-rc.1", name: "registry.local:5000/a/b/c",
		},
		{
			in:       "127.0.0.1:5000/mod:1",
			registry: "127.0.0.1:5000", repository: "mod", tag: "1",
			str: "127.0.0.1:5000/mod:1", name: "127.0.0.1:5000/mod",
		},
		{
			in:       "localhost/mod",
			registry: "localhost", repository: "mod", tag: "latest", latest: true,
			str: "localhost/mod:latest", name: "localhost/mod",
		},
		{
			in:       "localhost:5000/mod:3",
			registry: "localhost:5000", repository: "mod", tag: "3",
			str: "localhost:5000/mod:3", name: "localhost:5000/mod",
		},
		{
			in:       "[::1]:5000/mod:3",
			registry: "[::1]:5000", repository: "mod", tag: "3",
			str: "[::1]:5000/mod:3", name: "[::1]:5000/mod",
		},
		{
			in:       "busybox",
			registry: "docker.io", repository: "library/busybox", tag: "latest", latest: true,
			str: "docker.io/library/busybox:latest", name: "docker.io/library/busybox",
		},
		{
			in:       "busybox:1.36",
			registry: "docker.io", repository: "library/busybox", tag: "1.36",
			str: "docker.io/library/busybox:1.36", name: "docker.io/library/busybox",
		},
		{
			in:       "busybox@sha256:" + hexA,
			registry: "docker.io", repository: "library/busybox", digest: "sha256:" + hexA,
			str: "docker.io/library/busybox@sha256:" + hexA, name: "docker.io/library/busybox",
		},
		{
			in:       "acme/x:1",
			registry: "docker.io", repository: "acme/x", tag: "1",
			str: "docker.io/acme/x:1", name: "docker.io/acme/x",
		},
		{
			in:       "acme/x",
			registry: "docker.io", repository: "acme/x", tag: "latest", latest: true,
			str: "docker.io/acme/x:latest", name: "docker.io/acme/x",
		},
		{
			// Docker and kubelet read docker.io/busybox as the official image.
			in:       "docker.io/busybox:1",
			registry: "docker.io", repository: "library/busybox", tag: "1",
			str: "docker.io/library/busybox:1", name: "docker.io/library/busybox",
		},
		{
			in:       "docker.io/acme/x",
			registry: "docker.io", repository: "acme/x", tag: "latest", latest: true,
			str: "docker.io/acme/x:latest", name: "docker.io/acme/x",
		},
		{
			in:       "ghcr.io/acme/x:latest",
			registry: "ghcr.io", repository: "acme/x", tag: "latest", latest: true,
			str: "ghcr.io/acme/x:latest", name: "ghcr.io/acme/x",
		},
		{
			in:       "  ghcr.io/acme/x:1  ",
			registry: "ghcr.io", repository: "acme/x", tag: "1",
			str: "ghcr.io/acme/x:1", name: "ghcr.io/acme/x",
		},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			r, err := ParseReference(tt.in)
			if err != nil {
				t.Fatalf("ParseReference(%q): %v", tt.in, err)
			}
			if r.Registry != tt.registry || r.Repository != tt.repository || r.Tag != tt.tag || r.Digest != tt.digest {
				t.Errorf("ParseReference(%q) = {Registry:%q Repository:%q Tag:%q Digest:%q}, want {%q %q %q %q}",
					tt.in, r.Registry, r.Repository, r.Tag, r.Digest, tt.registry, tt.repository, tt.tag, tt.digest)
			}
			if r.Original != tt.in {
				t.Errorf("Original = %q, want %q", r.Original, tt.in)
			}
			if got := r.String(); got != tt.str {
				t.Errorf("String() = %q, want %q", got, tt.str)
			}
			if got := r.Name(); got != tt.name {
				t.Errorf("Name() = %q, want %q", got, tt.name)
			}
			if got := r.IsLatest(); got != tt.latest {
				t.Errorf("IsLatest() = %v, want %v", got, tt.latest)
			}
			// The canonical form parses back to itself.
			r2, err := ParseReference(r.String())
			if err != nil {
				t.Fatalf("ParseReference(String()=%q): %v", r.String(), err)
			}
			if r2.String() != r.String() {
				t.Errorf("String() does not round-trip: %q -> %q", r.String(), r2.String())
			}
		})
	}
}

func TestParseReferenceInvalid(t *testing.T) {
	for _, in := range []string{
		"",
		"   ",
		"oci://",
		"UPPER/case",
		"ghcr.io/Acme/x:1",
		"a:b:c",
		"ghcr.io/acme/x:-bad",
		"ghcr.io/acme/x@sha256:xyz",
		"ghcr.io/acme/x@sha256:" + hexA[:63],
		"ghcr.io/acme/x@sha256:" + strings.ToUpper(hexA),
		"ghcr.io/acme/x@md5:d41d8cd98f00b204e9800998ecf8427e",
		"ghcr.io/acme/x:" + strings.Repeat("t", 129),
		// An empty tag or digest (a template variable left empty) is not
		// a request for :latest.
		"busybox:",
		"ghcr.io/acme/x:",
		"ghcr.io/acme/x@",
		"ghcr.io/acme/x:1@",
	} {
		t.Run(in, func(t *testing.T) {
			r, err := ParseReference(in)
			if err == nil {
				t.Fatalf("ParseReference(%q) = %+v, want an error", in, r)
			}
			if !errors.Is(err, errdefs.ErrInvalidReference) {
				t.Errorf("error %v is not errdefs.ErrInvalidReference", err)
			}
			var pe *errdefs.Error
			if !errors.As(err, &pe) || pe.Image != in {
				t.Errorf("error %#v does not carry the image %q", err, in)
			}
			if !strings.Contains(err.Error(), "image "+in+": ") {
				t.Errorf("message %q does not name the input %q", err.Error(), in)
			}
			if r != (Reference{}) {
				t.Errorf("a failed parse returned %+v, want the zero Reference", r)
			}
		})
	}
}

// TestParseReferenceLimits checks the distribution grammar's length limits:
// a name of 255 characters (after normalisation) parses, 256 does not, and
// an oversized reference is refused without its whole text in the message.
func TestParseReferenceLimits(t *testing.T) {
	name := func(n int) string { // registry.local/aaa...: n characters
		return "registry.local/" + strings.Repeat("a", n-len("registry.local/"))
	}
	if r, err := ParseReference(name(255) + ":" + strings.Repeat("t", 128)); err != nil || len(r.Name()) != 255 {
		t.Errorf("a 255-character name: %+v, %v", r, err)
	}
	if r, err := ParseReference(name(255) + "@sha256:" + hexA); err != nil || len(r.Name()) != 255 {
		t.Errorf("a 255-character name with a digest: %+v, %v", r, err)
	}
	// "docker.io/library/" counts: 238 characters written are 256 after.
	hub := strings.Repeat("b", 256-len("docker.io/library/"))
	for _, in := range []string{
		name(256) + ":1",
		hub,
		"ghcr.io/" + strings.Repeat("a/", 200) + "a",
		strings.Repeat("a", 100<<10),
		"ghcr.io/acme/x:" + strings.Repeat("t", 100<<10),
		"ghcr.io/acme/x@sha256:" + strings.Repeat("a", 100<<10),
	} {
		r, err := ParseReference(in)
		if err == nil {
			t.Errorf("ParseReference(%d bytes) = %+v, want an error", len(in), r)
			continue
		}
		if !errors.Is(err, errdefs.ErrInvalidReference) {
			t.Errorf("%d bytes: error %v is not errdefs.ErrInvalidReference", len(in), err)
		}
		if msg := err.Error(); len(msg) > 400 || !strings.Contains(msg, "at most") {
			t.Errorf("%d bytes: message of %d bytes, want a short one saying the limit: %.500s", len(in), len(msg), msg)
		}
	}
}

func TestReferenceByDigest(t *testing.T) {
	r, err := ParseReference("oci://ghcr.io/acme/x:1.0")
	if err != nil {
		t.Fatal(err)
	}
	d := digest.Digest("sha256:" + hexB)
	b := r.ByDigest(d)
	want := Reference{Registry: "ghcr.io", Repository: "acme/x", Digest: d, Original: "oci://ghcr.io/acme/x:1.0"}
	if b != want {
		t.Errorf("ByDigest = %+v, want %+v", b, want)
	}
	if got := b.String(); got != "ghcr.io/acme/x@sha256:"+hexB {
		t.Errorf("ByDigest(...).String() = %q", got)
	}
	if b.IsLatest() {
		t.Error("a digest reference is not latest")
	}
	// r itself is unchanged.
	if r.Tag != "1.0" || r.Digest != "" {
		t.Errorf("ByDigest changed its receiver: %+v", r)
	}
}

func TestReferenceHost(t *testing.T) {
	for _, tt := range []struct{ registry, host string }{
		{"ghcr.io", "ghcr.io"},
		{"docker.io", "docker.io"},
		{"registry.local:5000", "registry.local"},
		{"localhost", "localhost"},
		{"localhost:5000", "localhost"},
		{"10.0.0.1:443", "10.0.0.1"},
		{"[::1]:5000", "::1"},
		{"[fe80::1]", "fe80::1"},
		{"[2001:db8::7]:8443", "2001:db8::7"},
	} {
		if got := (Reference{Registry: tt.registry}).Host(); got != tt.host {
			t.Errorf("Host() of %q = %q, want %q", tt.registry, got, tt.host)
		}
	}
	// And through the parser, for an IPv6 literal.
	r, err := ParseReference("[2001:db8::7]:8443/mods/x:1")
	if err != nil {
		t.Fatal(err)
	}
	if r.Registry != "[2001:db8::7]:8443" || r.Host() != "2001:db8::7" {
		t.Errorf("registry %q host %q", r.Registry, r.Host())
	}
}
