package credprovider

import (
	"strings"
	"testing"
)

// FuzzDecodeResponse feeds a plugin's stdout to the decoder: it never
// panics, an accepted answer has a valid cacheKeyType, and a refusal is one
// of the fixed messages, so nothing the plugin printed reaches an error.
func FuzzDecodeResponse(f *testing.F) {
	for _, seed := range []string{
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"r.io":{"username":"u","password":"p"}}}`,
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"5m"}`,
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"s3cret"}`,
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Global","token":"s3cret"}`,
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Global","auth":{"r.io":{"username":1}}}`,
		`{"apiVersion":"s3cret","kind":"CredentialProviderResponse"}`,
		`{"apiVersion":"credentialprovider.kubelet.k8s.io/v1alpha1","kind":"CredentialProviderResponse"}`,
		`not json s3cret`,
		`[]`,
	} {
		f.Add([]byte(seed))
	}
	cs, err := newCodecs()
	if err != nil {
		f.Fatal(err)
	}
	p := &plugin{apiVersion: "credentialprovider.kubelet.k8s.io/v1", codecs: cs}
	allowed := map[string]bool{
		"its stdout is not a JSON object": true,
		"its CredentialProviderResponse does not decode (unknown, duplicate or mistyped fields)":                                                              true,
		"its cacheKeyType is not Image, Registry or Global":                                                                                                   true,
		"its answer is not a CredentialProviderResponse of apiVersion credentialprovider.kubelet.k8s.io/v1 as configured (it has another apiVersion or kind)": true,
	}
	for v := range pluginVersions {
		allowed["its answer is not a CredentialProviderResponse of apiVersion credentialprovider.kubelet.k8s.io/v1 as configured (it has apiVersion "+v+")"] = true
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		resp, err := p.decode(data)
		if err != nil {
			msg := err.Error()
			if !allowed[msg] && !strings.HasPrefix(msg, "its answer decodes to *") {
				t.Fatalf("refusal %q is not one of the fixed messages", msg)
			}
			return
		}
		switch resp.CacheKeyType {
		case "Image", "Registry", "Global":
		default:
			t.Fatalf("accepted cacheKeyType %q", resp.CacheKeyType)
		}
	})
}

// FuzzMatchImage: matchImages matching never panics, and an image without
// glob characters matches itself as a pattern, as in kubelet.
func FuzzMatchImage(f *testing.F) {
	for _, s := range [][2]string{
		{"*.dkr.ecr.*.amazonaws.com", "1.dkr.ecr.us-east-1.amazonaws.com/x"},
		{"registry.io:5000/foo", "registry.io:5000/foo/bar"},
		{"[", "x/y"},
		{"*-docker.pkg.dev", "europe-docker.pkg.dev/p/r/i"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, image string) {
		matchImage(pattern, image)
		_ = checkPattern(pattern)
		if strings.ContainsAny(image, `*?[\`) {
			return
		}
		if u, err := parseSchemeless(image); err == nil && u.Host != "" && !matchImage(image, image) {
			t.Fatalf("%q does not match itself", image)
		}
	})
}
