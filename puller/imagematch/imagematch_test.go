package imagematch_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/imagematch"
)

// match parses image the way the driver does (puller.ParseReference, which
// normalises Docker Hub names) and matches it against one pattern.
func match(t *testing.T, pattern, image string) bool {
	t.Helper()
	p, err := imagematch.Parse(pattern)
	if err != nil {
		t.Fatalf("Parse(%q): %v", pattern, err)
	}
	ref, err := puller.ParseReference(image)
	if err != nil {
		t.Fatalf("ParseReference(%q): %v", image, err)
	}
	return p.Match(ref.Registry, ref.Repository)
}

func TestMatch(t *testing.T) {
	tests := []struct {
		pattern, image string
		want           bool
	}{
		// PATH: equal, or a prefix ending at a '/'.
		{"ghcr.io/acme", "ghcr.io/acme:1", true},
		{"ghcr.io/acme", "ghcr.io/acme/filters/header:1.0", true},
		{"ghcr.io/acme", "ghcr.io/acmecorp/x:1", false},
		{"ghcr.io/acme", "ghcr.io/acme-x:1", false},
		{"ghcr.io/acme/filters", "ghcr.io/acme/x:1", false},
		{"ghcr.io/acme/filters", "ghcr.io/acme/filters@sha256:" + strings.Repeat("a", 64), true},
		{"ghcr.io/acme/", "ghcr.io/acme/x:1", true}, // a trailing slash is the same pattern
		{"ghcr.io/acme", "docker.io/ghcr.io/acme:1", false},
		{"ghcr.io/acme", "evil.io/ghcr.io/acme:1", false},
		// HOST alone: every repository of that host, only without a port.
		{"ghcr.io", "ghcr.io/anything/at/all:1", true},
		{"ghcr.io", "ghcr.io:443/acme:1", false},
		{"ghcr.io", "ghcr.io.evil.com/acme:1", false},
		{"ghcr.io", "evilghcr.io/acme:1", false},
		{"GHCR.io", "ghcr.io/acme:1", true}, // host names are case-insensitive
		// PORT: exactly that port.
		{"registry.local:5000", "registry.local:5000/a/b:1", true},
		{"registry.local:5000", "registry.local:5001/a/b:1", false},
		{"registry.local:5000", "registry.local/a/b:1", false},
		{"localhost:5000/team", "localhost:5000/team/m:1", true},
		{"localhost:5000/team", "localhost:5000/other/m:1", false},
		{"[::1]:5000", "[::1]:5000/m:1", true},
		{"[::1]:5000", "[::2]:5000/m:1", false},
		{"127.0.0.1:5000", "127.0.0.1:5000/m:1", true},
		// '*' is one DNS label.
		{"*.dkr.ecr.*.amazonaws.com", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/acme/m:1", true},
		{"*.dkr.ecr.*.amazonaws.com", "dkr.ecr.eu-west-1.amazonaws.com/acme/m:1", false},
		{"*.dkr.ecr.*.amazonaws.com", "a.b.dkr.ecr.eu-west-1.amazonaws.com/acme/m:1", false},
		{"*.dkr.ecr.*.amazonaws.com", "1.dkr.ecr.eu-west-1.amazonaws.com.evil.io/acme/m:1", false},
		{"*.example.com", "example.com/m:1", false},
		{"*.example.com:5000/x", "a.example.com:5000/x/y:1", true},
		{"*.example.com:5000/x", "a.example.com/x/y:1", false},
		// Images are normalised before matching.
		{"docker.io/library", "nginx", true},
		{"docker.io/library/nginx", "nginx:1.27", true},
		{"docker.io/library/nginx", "docker.io/nginx", true},
		{"docker.io/library/nginx", "library/nginx", true},
		{"docker.io/library/nginx", "nginx-evil", false},
		{"docker.io/envoyproxy", "envoyproxy/envoy:v1", true},
		{"docker.io", "busybox", true},
		{"index.docker.io/library", "nginx", true},
		{"oci.example.com/a", "oci://oci.example.com/a/b:1", true},
		{"nginx", "nginx", false}, // a pattern always starts with a HOST
	}
	for _, tt := range tests {
		if got := match(t, tt.pattern, tt.image); got != tt.want {
			t.Errorf("pattern %q, image %q: match = %v, want %v", tt.pattern, tt.image, got, tt.want)
		}
	}
}

func TestParseRejects(t *testing.T) {
	for _, s := range []string{
		"",
		"  ",
		"https://ghcr.io/acme",
		"ghcr.io/acme:1.0",
		"ghcr.io/acme@sha256:" + strings.Repeat("a", 64),
		"ghcr.io/acme/*",
		"ghcr.io/ac*",
		"ghcr*.io",
		"*ghcr.io",
		"**.io",
		"ghcr.io:*",
		"ghcr.io:",
		"ghcr.io:0",
		"ghcr.io:65536",
		"ghcr.io:05000",
		"ghcr.io:http",
		"ghcr.io//acme",
		"ghcr.io/Acme",
		"ghcr.io/acme/../x",
		"/acme",
		".io",
		"ghcr..io",
		"-ghcr.io",
		"[::1",
		"[::1]x",
		"[::1]:",
		"[*]:5000",
		"ghcr io",
		"ghcr.io/a cme",
	} {
		if p, err := imagematch.Parse(s); err == nil {
			t.Errorf("Parse(%q) = %v, want an error", s, p)
		} else if !errors.Is(err, imagematch.ErrInvalidPattern) {
			t.Errorf("Parse(%q): error %v is not ErrInvalidPattern", s, err)
		}
	}
}

func TestParseListNamesEveryBadEntry(t *testing.T) {
	_, err := imagematch.ParseList([]string{"ghcr.io/acme", "ghcr.io/a*", "ok.io", "https://x.io"})
	if err == nil {
		t.Fatal("ParseList accepted bad patterns")
	}
	for _, want := range []string{"[1]", `"ghcr.io/a*"`, "[3]", `"https://x.io"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	if strings.Contains(err.Error(), "[0]") || strings.Contains(err.Error(), "[2]") {
		t.Errorf("error %q names a good pattern", err)
	}
}

func TestListMatchFirst(t *testing.T) {
	l, err := imagematch.ParseList([]string{"ghcr.io/acme/filters", "ghcr.io/acme", "registry.local:5000"})
	if err != nil {
		t.Fatal(err)
	}
	if p, ok := l.Match("ghcr.io", "acme/filters/x"); !ok || p.String() != "ghcr.io/acme/filters" {
		t.Errorf("Match = %v, %v; want the first pattern", p, ok)
	}
	if p, ok := l.Match("ghcr.io", "acme/other"); !ok || p.String() != "ghcr.io/acme" {
		t.Errorf("Match = %v, %v; want ghcr.io/acme", p, ok)
	}
	if _, ok := l.Match("ghcr.io", "other/x"); ok {
		t.Error("Match: ghcr.io/other/x matched")
	}
	if _, ok := (imagematch.List{}).Match("ghcr.io", "acme"); ok {
		t.Error("an empty list matched")
	}
	if got := strings.Join(l.Strings(), ","); got != "ghcr.io/acme/filters,ghcr.io/acme,registry.local:5000" {
		t.Errorf("Strings = %q", got)
	}
}

// FuzzMatch checks that a pattern made from an image's own name always
// matches it, and that matching never panics on arbitrary input.
func FuzzMatch(f *testing.F) {
	f.Add("ghcr.io/acme", "ghcr.io", "acme/x")
	f.Add("*.a.b:1/x", "q.a.b:1", "x/y")
	f.Add("[::1]:5000", "[::1]:5000", "m")
	f.Fuzz(func(t *testing.T, pattern, registry, repository string) {
		if p, err := imagematch.Parse(pattern); err == nil {
			p.Match(registry, repository)
		}
		ref, err := puller.ParseReference(registry + "/" + repository)
		if err != nil {
			return
		}
		p, err := imagematch.Parse(ref.Name())
		if err != nil {
			return // e.g. a registry name that is not DNS labels
		}
		if !p.Match(ref.Registry, ref.Repository) {
			t.Errorf("pattern %q does not match its own image %q", ref.Name(), ref.String())
		}
	})
}
