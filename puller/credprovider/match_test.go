package credprovider

import "testing"

// The matchImages cases of kubelet's documentation and of the managed
// clusters' plugins (ECR, Artifact Registry, ACR).
func TestMatchImage(t *testing.T) {
	for _, c := range []struct {
		pattern, image string
		want           bool
	}{
		{"123456789.dkr.ecr.us-east-1.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com/filters/header", true},
		{"*.dkr.ecr.*.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com/filters/header", true},
		{"*.dkr.ecr.*.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com.cn/filters/header", false},
		{"*.dkr.ecr.*.amazonaws.com.cn", "123456789.dkr.ecr.cn-north-1.amazonaws.com.cn/x", true},
		{"*.pkg.dev", "europe-docker.pkg.dev/p/r/i", true},
		{"*-docker.pkg.dev", "europe-docker.pkg.dev/p/r/i", true},
		{"*-docker.pkg.dev", "gcr.io/p/i", false},
		{"*.azurecr.io", "acme.azurecr.io/filters/x", true},
		// A '*' is one label, never several.
		{"*.azurecr.io", "a.b.azurecr.io/x", false},
		{"*.*.registry.io", "a.b.registry.io/x", true},
		{"*.registry.io", "registry.io/x", false},
		// Ports: none matches none; a port matches only itself.
		{"registry.io", "registry.io:5000/x", false},
		{"registry.io:5000", "registry.io:5000/x", true},
		{"registry.io:5000", "registry.io:5001/x", false},
		{"127.0.0.1:5000", "127.0.0.1:5000/net/filter", true},
		// Paths: a string prefix, as in kubelet (so "foo" matches "foobar").
		{"registry.io/foo", "registry.io/foo/bar", true},
		{"registry.io/foo", "registry.io/foobar", true},
		{"registry.io/foo", "registry.io/bar", false},
		{"registry.io/foo/bar", "registry.io/foo", false},
		{"docker.io", "docker.io/library/nginx", true},
		// Globs stay within the host.
		{"registry.io/*", "registry.io/x", false},
		// Patterns are parsed as URLs, as kubelet parses them: '?' starts
		// a query and '[' is not a host, so neither globs.
		{"reg?stry.io", "registry.io/x", false},
		{"[a-c]cme.azurecr.io", "acme.azurecr.io/x", false},
		{"acme-*.azurecr.io", "acme-prod.azurecr.io/x", true},
	} {
		if got := matchImage(c.pattern, c.image); got != c.want {
			t.Errorf("matchImage(%q, %q) = %v, want %v", c.pattern, c.image, got, c.want)
		}
	}
}

func TestCheckPattern(t *testing.T) {
	for _, ok := range []string{"*.dkr.ecr.*.amazonaws.com", "registry.io:5000/path", "*-docker.pkg.dev"} {
		if err := checkPattern(ok); err != nil {
			t.Errorf("checkPattern(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", "[.registry.io", "registry.io:port", "/path-only"} {
		if err := checkPattern(bad); err == nil {
			t.Errorf("checkPattern(%q) accepted it", bad)
		}
	}
}
