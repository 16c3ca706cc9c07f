package csi

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// codeOf is the one place domain errors become gRPC codes.
func codeOf(err error) codes.Code {
	switch {
	case errors.Is(err, errdefs.ErrInvalidReference), errors.Is(err, errdefs.ErrInvalidArgument),
		errors.Is(err, errdefs.ErrBlockedAddress): // the pod named a registry it may not use
		return codes.InvalidArgument
	case errors.Is(err, errdefs.ErrNotFound):
		return codes.NotFound
	case errors.Is(err, errdefs.ErrUnauthorized), errors.Is(err, errdefs.ErrNotAllowed), errors.Is(err, errdefs.ErrRegistryBlocked):
		return codes.PermissionDenied
	case errors.Is(err, errdefs.ErrPullPending):
		return codes.DeadlineExceeded
	case errors.Is(err, errdefs.ErrUnavailable):
		return codes.Unavailable
	case errors.Is(err, errdefs.ErrUnsupportedImage), errors.Is(err, errdefs.ErrInvalidModule),
		errors.Is(err, errdefs.ErrTooLarge), errors.Is(err, errdefs.ErrDigestMismatch),
		errors.Is(err, errdefs.ErrNotPresent), errors.Is(err, errdefs.ErrConfigInvalid), errors.Is(err, errdefs.ErrNotVerified):
		return codes.FailedPrecondition
	case errors.Is(err, errdefs.ErrVolumeConflict):
		return codes.AlreadyExists
	case errors.Is(err, errdefs.ErrNoSpace):
		return codes.ResourceExhausted
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	}
	return codes.Internal
}

// toStatus turns a domain error into a gRPC status error.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(codeOf(err), err.Error())
}
