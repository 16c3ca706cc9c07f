// Package errdefs holds the driver's one error type and every sentinel error
// the puller and the node layers return.
//
// It owns: the sentinels (tested with errors.Is) and Error, which carries a
// sentinel kind, the image concerned, a message a user can act on and the
// underlying cause.
//
// It must not: import any other package of this module, or know about gRPC.
// Only the csi package turns these sentinels into status codes, in one
// function; a sentinel added here needs a row there (csi's tests fail on an
// unmapped one).
package errdefs

import (
	"errors"
	"fmt"
)

// Sentinels of the puller: turning a reference into module bytes.
var (
	// ErrInvalidReference: the image reference cannot be parsed.
	ErrInvalidReference = errors.New("invalid image reference")
	// ErrNotFound: the repository, tag or digest is not in the registry.
	ErrNotFound = errors.New("not found in registry")
	// ErrUnauthorized: the registry refused the credentials, or had none it accepts.
	ErrUnauthorized = errors.New("registry refused the credentials")
	// ErrUnavailable: the registry did not answer, answered 5xx, or sent bytes
	// that do not match their digest. Retrying may help.
	ErrUnavailable = errors.New("registry unavailable")
	// ErrUnsupportedImage: the image is not a Wasm module in a known layout.
	ErrUnsupportedImage = errors.New("not a Wasm module in a known layout")
	// ErrTooLarge: the module, manifest or layer exceeds a configured limit.
	ErrTooLarge = errors.New("exceeds size limit")
	// ErrBlockedAddress: the image's registry (or a redirect or token realm
	// it sent the puller to) resolves to an address the driver does not
	// dial: loopback, link-local, cloud metadata or registries.blockedCIDRs.
	ErrBlockedAddress = errors.New("the image's registry resolves to a blocked address")
	// ErrRegistryBlocked: the node's container runtime configuration
	// (registries.conf blocked = true) refuses the image's registry.
	ErrRegistryBlocked = errors.New("registry blocked by the runtime's configuration")
)

// Sentinels of both layers: the puller returns ErrInvalidModule for bytes
// that are not Wasm, the node for a module that fails the configured
// validation.
var (
	// ErrInvalidModule: the module is not a valid Wasm module, or failed the
	// configured validation.
	ErrInvalidModule = errors.New("invalid Wasm module")
)

// Sentinels of signature verification (puller/verify). A registry that
// cannot be asked for signatures is ErrUnavailable.
var (
	// ErrNotVerified: no signature the image's verification policy trusts
	// covers it, or no policy matches it and unmatched images are denied.
	ErrNotVerified = errors.New("signature verification failed")
)

// Sentinels of the node: the store, volumes and the host.
var (
	// ErrInvalidArgument: the caller's request is malformed.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotPresent: pullPolicy Never and the module is not on the node.
	ErrNotPresent = errors.New("module not present on the node")
	// ErrDigestMismatch: the module does not match the sha256 the pod pinned.
	ErrDigestMismatch = errors.New("module does not match the pinned sha256")
	// ErrVolumeConflict: the volume id is published at the target with another image.
	ErrVolumeConflict = errors.New("volume already published with different attributes")
	// ErrStoreFormat: the store on disk is of a format this driver does not
	// read (written by a newer driver, or its record is unreadable).
	ErrStoreFormat = errors.New("unknown store format")
	// ErrNoSpace: the store's disk is full.
	ErrNoSpace = errors.New("no space left in the module store")
	// ErrInternal: a host operation failed (mount, filesystem).
	ErrInternal = errors.New("node operation failed")
	// ErrPullPending: the caller gave up while its pull goes on.
	ErrPullPending = errors.New("pull still in progress")
	// ErrNotAllowed: the image is outside the config's registries.allowed.
	ErrNotAllowed = errors.New("image not allowed")
	// ErrConfigInvalid: the config file was refused at start, so nothing
	// is served until it is fixed (a security setting never fails open).
	ErrConfigInvalid = errors.New("the driver's config file is invalid")
)

// Error is what the puller and the node return: the kind (one of the
// sentinels), the image it concerns (may be empty), a message a user can act
// on, and the underlying cause.
type Error struct {
	Kind  error
	Image string
	Msg   string
	Cause error
}

func (e *Error) Error() string {
	s := e.Msg
	if e.Image != "" {
		s = fmt.Sprintf("image %s: %s", e.Image, e.Msg)
	}
	if e.Cause != nil {
		s += ": " + e.Cause.Error()
	}
	return s
}

// Unwrap exposes both the kind and the cause to errors.Is and errors.As.
func (e *Error) Unwrap() []error {
	if e.Cause == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Cause}
}

// New returns an *Error of the given kind; format and args make its message.
func New(kind error, image string, cause error, format string, args ...any) *Error {
	return &Error{Kind: kind, Image: image, Msg: fmt.Sprintf(format, args...), Cause: cause}
}
