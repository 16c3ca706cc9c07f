package node

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Damping spaces out the pulls of an image that keeps failing, so that a
// hundred pods whose kubelets retry it do not hammer its registry. After a
// failed pull of an image, its pulls within the next window fail at once
// with the last error instead of asking the registry. The window is 1s
// after one failure and doubles with each failure in a row, up to 5
// minutes; it ends the moment one pull of the image succeeds, and for
// every image when the config file changes.
//
// What is damped is what the registry or the image decided: not found,
// refused credentials, unavailable or hanging, not Wasm, invalid, too
// large, a blocked address. What is not: a full disk (ResourceExhausted is
// the node's to fix, and freeing space must work at kubelet's next retry)
// and other failures of the node itself (errdefs.ErrInternal), nor a caller that
// gave up while its pull goes on (errdefs.ErrPullPending: the pull has not failed).
//
// A refusal of credentials is the credentials', not the image's: it damps
// only the pulls that present the same credentials (the same pull secrets),
// so a pod with a secret that works is not held back by one without.
const (
	dampingBase = time.Second
	dampingMax  = 5 * time.Minute
)

// damper holds the damping of every image that failed lately, keyed by
// image reference. Its clock is injected for tests.
//
// It is not client-go's flowcontrol.Backoff (kubelet's image pull backoff),
// on purpose: Backoff keeps one duration per key and nothing else, while a
// damped pull must fail with the image's last error (its kind, so its code,
// and its message), which needs this map anyway; Backoff counts failures per
// key, while here a refusal for one set of credentials and a failure of the
// image share the image's count (the windows differ, the streak does not);
// and Backoff forgets a key 2×max after its last failure, where this forgets
// an image max after its window ended (TestDamperForgets). What Backoff would
// replace is the doubling and the cap, the two lines of failed().
type damper struct {
	now       func() time.Time
	base, max time.Duration

	mu     sync.Mutex
	images map[string]*imageDamping
}

// imageDamping is one image's: its failures in a row (any credentials) and
// the window they set, image-wide or for one set of credentials.
type imageDamping struct {
	failures int
	shared   *dampWindow
	byCreds  map[string]*dampWindow
}

type dampWindow struct {
	until    time.Time
	err      error
	failures int
}

func newDamper(now func() time.Time) *damper {
	if now == nil {
		now = time.Now
	}
	return &damper{now: now, base: dampingBase, max: dampingMax, images: map[string]*imageDamping{}}
}

// dampable reports whether a pull's failure damps its image.
func dampable(err error) bool {
	switch {
	case err == nil, errors.Is(err, errdefs.ErrNoSpace), errors.Is(err, errdefs.ErrPullPending):
		return false
	}
	for _, kind := range []error{errdefs.ErrNotFound, errdefs.ErrUnauthorized, errdefs.ErrUnavailable,
		errdefs.ErrUnsupportedImage, errdefs.ErrInvalidModule, errdefs.ErrTooLarge, errdefs.ErrBlockedAddress,
		errdefs.ErrInvalidReference} {
		if errors.Is(err, kind) {
			return true
		}
	}
	return false
}

// check returns the error a pull of image with creds fails with at once,
// or nil when the pull may ask the registry.
func (d *damper) check(image, creds string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	im := d.images[image]
	if im == nil {
		return nil
	}
	now := d.now()
	for _, w := range []*dampWindow{im.shared, im.byCreds[creds]} {
		if w != nil && now.Before(w.until) {
			return &dampedError{err: w.err, until: w.until, left: w.until.Sub(now), failures: w.failures}
		}
	}
	return nil
}

// done records how a pull of image with creds ended.
func (d *damper) done(image, creds string, err error) {
	if err == nil {
		d.succeeded(image)
		return
	}
	if dampable(err) {
		d.failed(image, creds, err)
	}
}

// succeeded ends the damping of image.
func (d *damper) succeeded(image string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.images, image)
}

// reset ends the damping of every image.
func (d *damper) reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	clear(d.images)
}

// failed records a failed pull and returns the end of the window it sets.
func (d *damper) failed(image, creds string, err error) time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	d.forget(now)
	im := d.images[image]
	if im == nil {
		im = &imageDamping{}
		d.images[image] = im
	}
	im.failures++
	wait := d.max
	if im.failures < 32 {
		if w := d.base << (im.failures - 1); w > 0 && w < d.max {
			wait = w
		}
	}
	w := &dampWindow{until: now.Add(wait), err: err, failures: im.failures}
	if errors.Is(err, errdefs.ErrUnauthorized) {
		if im.byCreds == nil {
			im.byCreds = map[string]*dampWindow{}
		}
		im.byCreds[creds] = w
	} else {
		im.shared = w
	}
	return w.until
}

// forget drops images whose last window ended more than max ago, so that
// images nobody asks for any more do not stay in memory; their next
// failure starts again at base.
func (d *damper) forget(now time.Time) {
	for image, im := range d.images {
		last := time.Time{}
		if im.shared != nil {
			last = im.shared.until
		}
		for _, w := range im.byCreds {
			if w.until.After(last) {
				last = w.until
			}
		}
		if now.Sub(last) > d.max {
			delete(d.images, image)
		}
	}
}

// dampedError is a pull refused without asking the registry: it is the
// last failure of the image (so it has the same kind and code), and says
// when the registry will be asked again.
type dampedError struct {
	err      error
	until    time.Time
	left     time.Duration
	failures int
}

func (e *dampedError) Error() string {
	times := "once"
	if e.failures > 1 {
		times = fmt.Sprintf("%d times in a row", e.failures)
	}
	return fmt.Sprintf("%s (pulls of this image failed %s, so the registry is not asked again yet: retrying after %s, in %s)",
		e.err.Error(), times, e.until.UTC().Format(time.RFC3339), e.left.Round(100*time.Millisecond))
}

func (e *dampedError) Unwrap() error { return e.err }
