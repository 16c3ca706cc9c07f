package puller

import (
	"fmt"
	"strings"
	"testing"
)

// keyringOf is a keyring with one credential per key, whose username is
// the key itself, so a lookup shows which keys matched.
func keyringOf(t *testing.T, keys ...string) *Keyring {
	t.Helper()
	var auths []string
	for _, k := range keys {
		auths = append(auths, fmt.Sprintf("%q:{\"username\":%q,\"password\":\"p\"}", k, k))
	}
	k, err := ParseDockerConfigJSON("secret ns/s", []byte(`{"auths":{`+strings.Join(auths, ",")+`}}`))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func matched(t *testing.T, k *Keyring, image string) string {
	t.Helper()
	ref, err := ParseReference(image)
	if err != nil {
		t.Fatal(err)
	}
	var users []string
	for _, c := range k.Lookup(ref) {
		users = append(users, c.Cred.Username)
	}
	return strings.Join(users, " ")
}

// TestKeyringKubeletExamples: the examples of Kubernetes' documentation
// ("Interpretation of config.json", concepts/containers/images) give the
// same result here as in kubelet.
func TestKeyringKubeletExamples(t *testing.T) {
	tests := []struct {
		keys  []string
		image string
		want  string // matching keys, most specific first
	}{
		// Globs match one whole label each.
		{[]string{"*.kubernetes.io"}, "kubernetes.io/x", ""},
		{[]string{"*.kubernetes.io"}, "abc.kubernetes.io/x", "*.kubernetes.io"},
		{[]string{"*.*.kubernetes.io"}, "abc.kubernetes.io/x", ""},
		{[]string{"*.*.kubernetes.io"}, "abc.def.kubernetes.io/x", "*.*.kubernetes.io"},
		{[]string{"prefix.*.io"}, "prefix.kubernetes.io/x", "prefix.*.io"},
		{[]string{"*-good.kubernetes.io"}, "prefix-good.kubernetes.io/x", "*-good.kubernetes.io"},
		// Path prefixes, and a glob and a plain host side by side.
		{[]string{"my-registry.io/images", "*.my-registry.io/images"}, "my-registry.io/images", "my-registry.io/images"},
		{[]string{"my-registry.io/images", "*.my-registry.io/images"}, "my-registry.io/images/my-image", "my-registry.io/images"},
		{[]string{"my-registry.io/images", "*.my-registry.io/images"}, "my-registry.io/images/another-image", "my-registry.io/images"},
		{[]string{"my-registry.io/images", "*.my-registry.io/images"}, "sub.my-registry.io/images/my-image", "*.my-registry.io/images"},
		{[]string{"my-registry.io/images", "*.my-registry.io/images"}, "a.sub.my-registry.io/images/my-image", ""},
		{[]string{"my-registry.io/images", "*.my-registry.io/images"}, "a.b.sub.my-registry.io/images/my-image", ""},
		// Every matching entry is tried, the most specific first.
		{[]string{"my-registry.io/images", "my-registry.io/images/subpath"}, "my-registry.io/images/subpath/my-image",
			"my-registry.io/images/subpath my-registry.io/images"},
	}
	for _, tt := range tests {
		if got := matched(t, keyringOf(t, tt.keys...), tt.image); got != tt.want {
			t.Errorf("keys %q, image %s: matched %q, want %q", tt.keys, tt.image, got, tt.want)
		}
	}
}

// TestKeyringWhereKubeletDiffers pins the two rules where the driver
// deliberately differs from kubelet (the README's "Private registries"
// says why).
func TestKeyringWhereKubeletDiffers(t *testing.T) {
	// A key without a port matches the host on any port (kubelet: only
	// without a port); a key with a port only that port, as in kubelet.
	k := keyringOf(t, "registry.example", "registry.example:5000")
	if got := matched(t, k, "registry.example:5000/team/x"); got != "registry.example registry.example:5000" && got != "registry.example:5000 registry.example" {
		t.Errorf("image on port 5000 matched %q, want both keys", got)
	}
	if got := matched(t, k, "registry.example:6000/team/x"); got != "registry.example" {
		t.Errorf("image on port 6000 matched %q, want the port-less key only", got)
	}
	// A path matches whole segments (kubelet: any string prefix, so
	// "team" would match "teamx/...").
	k = keyringOf(t, "registry.example/team")
	if got := matched(t, k, "registry.example/teamx/x"); got != "" {
		t.Errorf("registry.example/team matched registry.example/teamx/x: %q", got)
	}
	if got := matched(t, k, "registry.example/team/x"); got != "registry.example/team" {
		t.Errorf("registry.example/team did not match registry.example/team/x: %q", got)
	}
}
