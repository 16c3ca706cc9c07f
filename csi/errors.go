package csi

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/node"
	"github.com/wasm-csi/wasm-csi/puller"
)

// codeOf is the one place domain errors become gRPC codes.
func codeOf(err error) codes.Code {
	switch {
	case errors.Is(err, puller.ErrInvalidReference), errors.Is(err, node.ErrInvalidArgument),
		errors.Is(err, puller.ErrBlockedAddress): // the pod named a registry it may not use
		return codes.InvalidArgument
	case errors.Is(err, puller.ErrNotFound):
		return codes.NotFound
	case errors.Is(err, puller.ErrUnauthorized):
		return codes.PermissionDenied
	case errors.Is(err, node.ErrPullPending):
		return codes.DeadlineExceeded
	case errors.Is(err, puller.ErrUnavailable):
		return codes.Unavailable
	case errors.Is(err, puller.ErrUnsupportedImage), errors.Is(err, puller.ErrInvalidModule),
		errors.Is(err, node.ErrInvalidModule), errors.Is(err, puller.ErrTooLarge), errors.Is(err, node.ErrDigestMismatch),
		errors.Is(err, node.ErrNotPresent):
		return codes.FailedPrecondition
	case errors.Is(err, node.ErrVolumeConflict):
		return codes.AlreadyExists
	case errors.Is(err, node.ErrNoSpace):
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
