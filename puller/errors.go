package puller

import (
	"errors"
	"fmt"
)

// Sentinel errors. Callers test them with errors.Is; only the csi package
// turns them into gRPC status codes.
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
	// ErrInvalidModule: the module's bytes are not a valid Wasm module.
	ErrInvalidModule = errors.New("invalid Wasm module")
	// ErrTooLarge: the module, manifest or layer exceeds a configured limit.
	ErrTooLarge = errors.New("exceeds size limit")
	// ErrBlockedAddress: the image's registry (or a redirect or token realm
	// it sent the puller to) resolves to an address the driver does not
	// dial: loopback, link-local, cloud metadata or registries.blockedCIDRs.
	ErrBlockedAddress = errors.New("the image's registry resolves to a blocked address")
)

// Error is what the puller returns: the kind (one of the sentinels), the
// image it concerns, a message a user can act on, and the underlying cause.
type Error struct {
	Kind  error
	Image string
	Msg   string
	Cause error
}

func (e *Error) Error() string {
	s := fmt.Sprintf("image %s: %s", e.Image, e.Msg)
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

func newError(kind error, image string, cause error, format string, args ...any) *Error {
	return &Error{Kind: kind, Image: image, Msg: fmt.Sprintf(format, args...), Cause: cause}
}
