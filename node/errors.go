package node

import (
	"errors"
	"fmt"
)

// Sentinel errors of the node layer. The csi package maps them (and the
// puller's) to gRPC codes.
var (
	// ErrInvalidArgument: the caller's request is malformed.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotPresent: pullPolicy Never and the module is not on the node.
	ErrNotPresent = errors.New("module not present on the node")
	// ErrDigestMismatch: the module does not match the sha256 the pod pinned.
	ErrDigestMismatch = errors.New("module does not match the pinned sha256")
	// ErrVolumeConflict: the volume id is published at the target with another image.
	ErrVolumeConflict = errors.New("volume already published with different attributes")
	// ErrNoSpace: the store's disk is full.
	ErrNoSpace = errors.New("no space left in the module store")
	// ErrInternal: a host operation failed (mount, filesystem).
	ErrInternal = errors.New("node operation failed")
	// ErrPullPending: the caller gave up while its pull goes on.
	ErrPullPending = errors.New("pull still in progress")
	// ErrInvalidModule: the module failed the configured validation.
	ErrInvalidModule = errors.New("module failed validation")
)

// Error carries a sentinel kind, the image concerned and a message.
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

// Unwrap exposes the kind and the cause to errors.Is and errors.As.
func (e *Error) Unwrap() []error {
	if e.Cause == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Cause}
}

func newError(kind error, image string, cause error, format string, args ...any) *Error {
	return &Error{Kind: kind, Image: image, Msg: fmt.Sprintf(format, args...), Cause: cause}
}
