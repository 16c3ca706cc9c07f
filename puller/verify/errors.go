package verify

import (
	"fmt"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Failure is a refusal: the image, digest and policy, and what was found.
type Failure struct {
	Image   string
	Digest  digest.Digest
	Policy  string // empty: no policy matched and unmatched is deny
	Reasons []string
}

func (f *Failure) Error() string {
	if f.Policy == "" {
		return fmt.Sprintf("image %s (%s): no verification policy matches it and verification.unmatched is deny; add a policy whose images match, or allow unmatched images", f.Image, f.Digest)
	}
	return fmt.Sprintf("image %s (%s) not verified by policy %s: %s", f.Image, f.Digest, f.Policy, strings.Join(f.Reasons, "; "))
}

// Unwrap makes a Failure an errdefs.ErrNotVerified (FailedPrecondition).
func (f *Failure) Unwrap() error { return errdefs.ErrNotVerified }

// Reason is the first thing found wrong, short (for logs and events).
func (f *Failure) Reason() string {
	if len(f.Reasons) == 0 {
		return "no policy matches"
	}
	return f.Reasons[0]
}
