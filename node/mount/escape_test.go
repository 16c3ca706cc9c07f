package mount

import "testing"

func TestOverlayEscape(t *testing.T) {
	for in, want := range map[string]string{
		"/var/lib/wasm-csi/views/ab12": "/var/lib/wasm-csi/views/ab12",
		`/a,b:c\d`:                     `/a\,b\:c\\d`,
		"":                             "",
	} {
		if got := overlayEscape(in); got != want {
			t.Errorf("overlayEscape(%q) = %q, want %q", in, got, want)
		}
	}
}
