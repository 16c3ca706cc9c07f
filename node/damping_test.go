package node

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func unavailable(msg string) error {
	return &errdefs.Error{Kind: errdefs.ErrUnavailable, Image: "r.example/a:1", Msg: msg}
}

// TestDamperBackoff: each failure in a row doubles the window, from 1s up
// to 5 minutes; a pull inside it fails at once with the last error, its
// kind kept; one success ends it.
func TestDamperBackoff(t *testing.T) {
	clk := &fakeClock{t: time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)}
	d := newDamper(clk.now)
	const img = "r.example/a:1"
	if err := d.check(img, ""); err != nil {
		t.Fatalf("an image that never failed is damped: %v", err)
	}
	want := []time.Duration{1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300}
	for i, w := range want {
		w *= time.Second
		err := unavailable(fmt.Sprintf("failure %d", i+1))
		until := d.failed(img, "", err)
		if got := until.Sub(clk.t); got != w {
			t.Fatalf("failure %d: window %v, want %v", i+1, got, w)
		}
		got := d.check(img, "")
		if got == nil {
			t.Fatalf("failure %d: not damped right after it", i+1)
		}
		if !errors.Is(got, errdefs.ErrUnavailable) || !errors.Is(got, err) {
			t.Errorf("failure %d: damped error %v lost the last error's kind", i+1, got)
		}
		for _, s := range []string{"r.example/a:1", fmt.Sprintf("failure %d", i+1), "retrying after " + until.Format(time.RFC3339)} {
			if !strings.Contains(got.Error(), s) {
				t.Errorf("failure %d: damped error %q does not say %q", i+1, got, s)
			}
		}
		clk.advance(w - time.Millisecond)
		if d.check(img, "") == nil {
			t.Fatalf("failure %d: not damped %v into a %v window", i+1, w-time.Millisecond, w)
		}
		clk.advance(time.Millisecond)
		if err := d.check(img, ""); err != nil {
			t.Fatalf("failure %d: still damped when the %v window ended: %v", i+1, w, err)
		}
	}
	// Other images are not touched.
	if err := d.check("r.example/b:1", ""); err != nil {
		t.Errorf("another image is damped: %v", err)
	}
	// One success resets: the next failure is back to 1s.
	d.done(img, "", nil)
	if err := d.check(img, ""); err != nil {
		t.Fatalf("damped after a success: %v", err)
	}
	if until := d.failed(img, "", unavailable("again")); until.Sub(clk.t) != time.Second {
		t.Errorf("first failure after a success: window %v, want 1s", until.Sub(clk.t))
	}
}

// TestDamperWhatIsDamped: registry and image failures damp; a full disk,
// a failure of the node and a caller's deadline do not.
func TestDamperWhatIsDamped(t *testing.T) {
	tests := []struct {
		name string
		err  error
		damp bool
	}{
		{"unavailable", unavailable("503"), true},
		{"not found", &errdefs.Error{Kind: errdefs.ErrNotFound, Image: "x", Msg: "m"}, true},
		{"not wasm", &errdefs.Error{Kind: errdefs.ErrUnsupportedImage, Image: "x", Msg: "m"}, true},
		{"too large", &errdefs.Error{Kind: errdefs.ErrTooLarge, Image: "x", Msg: "m"}, true},
		{"blocked", &errdefs.Error{Kind: errdefs.ErrBlockedAddress, Image: "x", Msg: "m"}, true},
		{"invalid module", &errdefs.Error{Kind: errdefs.ErrInvalidModule, Image: "x", Msg: "m"}, true},
		{"unauthorized", &errdefs.Error{Kind: errdefs.ErrUnauthorized, Image: "x", Msg: "m"}, true},
		{"no space", &errdefs.Error{Kind: errdefs.ErrNoSpace, Image: "x", Msg: "m"}, false},
		{"internal", &errdefs.Error{Kind: errdefs.ErrInternal, Image: "x", Msg: "m", Cause: errors.New("EIO")}, false},
		{"pending", &errdefs.Error{Kind: errdefs.ErrPullPending, Image: "x", Msg: "m", Cause: context.DeadlineExceeded}, false},
		{"plain", errors.New("boom"), false},
	}
	for _, tt := range tests {
		d := newDamper((&fakeClock{t: time.Unix(1e9, 0)}).now)
		d.done("img", "", tt.err)
		if got := d.check("img", "") != nil; got != tt.damp {
			t.Errorf("%s: damped = %v, want %v", tt.name, got, tt.damp)
		}
	}
}

// TestDamperCredentials: a refusal of credentials damps only the pulls
// with the same credentials; any success of the image ends every window.
func TestDamperCredentials(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	d := newDamper(clk.now)
	denied := &errdefs.Error{Kind: errdefs.ErrUnauthorized, Image: "img", Msg: "refused every credential tried (secret ns/a)"}
	d.done("img", "ns/a", denied)
	if err := d.check("img", "ns/a"); !errors.Is(err, errdefs.ErrUnauthorized) {
		t.Errorf("same credentials: %v, want the refusal again", err)
	}
	if err := d.check("img", "ns/b"); err != nil {
		t.Errorf("other credentials are damped by a refusal of ns/a: %v", err)
	}
	if err := d.check("img", ""); err != nil {
		t.Errorf("node credentials are damped by a refusal of ns/a: %v", err)
	}
	// An image-wide failure damps everyone.
	d.done("img", "ns/b", unavailable("503"))
	for _, c := range []string{"", "ns/a", "ns/b", "ns/c"} {
		if d.check("img", c) == nil {
			t.Errorf("credentials %q not damped after a 503", c)
		}
	}
	d.done("img", "ns/b", nil)
	for _, c := range []string{"", "ns/a", "ns/b"} {
		if err := d.check("img", c); err != nil {
			t.Errorf("credentials %q still damped after a success: %v", c, err)
		}
	}
}

// TestDamperForgets: an image nobody asked for since its window ended
// more than the longest window ago is dropped from memory.
func TestDamperForgets(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	d := newDamper(clk.now)
	for i := 0; i < 5; i++ {
		d.failed("old", "", unavailable("x"))
	}
	clk.advance(16*time.Second + dampingMax + time.Second)
	d.failed("new", "", unavailable("y"))
	if _, ok := d.images["old"]; ok {
		t.Error("an image idle for longer than the longest window is still remembered")
	}
	if until := d.failed("old", "", unavailable("x")); until.Sub(clk.t) != time.Second {
		t.Errorf("a forgotten image starts again at %v, want 1s", until.Sub(clk.t))
	}
}

// TestDamperReset: a config change ends every window.
func TestDamperReset(t *testing.T) {
	d := newDamper((&fakeClock{t: time.Unix(1e9, 0)}).now)
	d.failed("a", "", unavailable("x"))
	d.failed("b", "ns/s", &errdefs.Error{Kind: errdefs.ErrUnauthorized, Image: "b", Msg: "m"})
	d.reset()
	if d.check("a", "") != nil || d.check("b", "ns/s") != nil {
		t.Error("damped after reset")
	}
}
