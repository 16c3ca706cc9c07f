package csi

import (
	"context"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/node"
	"github.com/wasm-csi/wasm-csi/puller"
)

const img = "ghcr.io/acme/x:1"

// forms returns kind as the code sees it: bare, in each package's *Error,
// with and without a cause, and wrapped again with %w.
func forms(kind error) map[string]error {
	pe := &puller.Error{Kind: kind, Image: img, Msg: "m"}
	ne := &node.Error{Kind: kind, Image: img, Msg: "m"}
	return map[string]error{
		"bare":               kind,
		"%w":                 fmt.Errorf("publishing: %w", kind),
		"puller.Error":       pe,
		"puller.Error+cause": &puller.Error{Kind: kind, Image: img, Msg: "m", Cause: io.ErrUnexpectedEOF},
		"%w puller.Error":    fmt.Errorf("pull: %w", pe),
		"node.Error":         ne,
		"node.Error+cause":   &node.Error{Kind: kind, Msg: "m", Cause: syscall.EIO},
		"%w %w node.Error":   fmt.Errorf("a: %w", fmt.Errorf("b: %w", ne)),
		// A host failure (ErrInternal) caused by a domain error takes
		// the cause's code: ErrInternal is only the fallback.
		"node.Error(puller)":    &node.Error{Kind: node.ErrInternal, Image: img, Msg: "m", Cause: pe},
		"errors.Join":           errors.Join(errors.New("other"), kind),
		"puller.Error in chain": &puller.Error{Kind: kind, Image: img, Msg: "m", Cause: errors.New("x")},
	}
}

// sentinels is every exported Err* of the puller and node packages, and the
// code CONTRACT.md's "Status codes" list gives it.
type codeCase struct {
	name string
	kind error
	code codes.Code
}

var sentinels = []codeCase{
	{"puller.ErrInvalidReference", puller.ErrInvalidReference, codes.InvalidArgument},
	{"node.ErrInvalidArgument", node.ErrInvalidArgument, codes.InvalidArgument},
	{"puller.ErrBlockedAddress", puller.ErrBlockedAddress, codes.InvalidArgument},
	{"puller.ErrNotFound", puller.ErrNotFound, codes.NotFound},
	{"puller.ErrUnauthorized", puller.ErrUnauthorized, codes.PermissionDenied},
	{"puller.ErrUnavailable", puller.ErrUnavailable, codes.Unavailable},
	{"node.ErrPullPending", node.ErrPullPending, codes.DeadlineExceeded},
	{"puller.ErrUnsupportedImage", puller.ErrUnsupportedImage, codes.FailedPrecondition},
	{"puller.ErrInvalidModule", puller.ErrInvalidModule, codes.FailedPrecondition},
	{"puller.ErrTooLarge", puller.ErrTooLarge, codes.FailedPrecondition},
	{"node.ErrInvalidModule", node.ErrInvalidModule, codes.FailedPrecondition},
	{"node.ErrDigestMismatch", node.ErrDigestMismatch, codes.FailedPrecondition},
	{"node.ErrNotPresent", node.ErrNotPresent, codes.FailedPrecondition},
	{"node.ErrVolumeConflict", node.ErrVolumeConflict, codes.AlreadyExists},
	{"node.ErrNoSpace", node.ErrNoSpace, codes.ResourceExhausted},
	{"node.ErrInternal", node.ErrInternal, codes.Internal},
}

func TestCodeOf(t *testing.T) {
	tests := append(slices.Clone(sentinels),
		codeCase{"context.DeadlineExceeded", context.DeadlineExceeded, codes.DeadlineExceeded},
		codeCase{"context.Canceled", context.Canceled, codes.Canceled},
	)
	for _, tt := range tests {
		for form, err := range forms(tt.kind) {
			if got := codeOf(err); got != tt.code {
				t.Errorf("codeOf(%s as %s) = %v, want %v", tt.name, form, got, tt.code)
			}
		}
	}
}

// TestSentinelsCovered fails when a package gains an exported sentinel
// that the table above (and so, likely, codeOf) does not know.
func TestSentinelsCovered(t *testing.T) {
	known := map[string]bool{}
	for _, s := range sentinels {
		known[s.name] = true
	}
	found := 0
	for _, pkg := range []string{"puller", "node"} {
		files, err := filepath.Glob(filepath.Join("..", pkg, "*.go"))
		if err != nil || len(files) == 0 {
			t.Fatalf("no sources for %s: %v", pkg, err)
		}
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			af, err := parser.ParseFile(token.NewFileSet(), f, nil, 0)
			if err != nil {
				t.Fatal(err)
			}
			for _, decl := range af.Decls {
				gd, ok := decl.(*ast.GenDecl)
				if !ok || gd.Tok != token.VAR {
					continue
				}
				for _, spec := range gd.Specs {
					for _, id := range spec.(*ast.ValueSpec).Names {
						if !strings.HasPrefix(id.Name, "Err") {
							continue
						}
						found++
						if name := pkg + "." + id.Name; !known[name] {
							t.Errorf("%s (in %s) has no row in the sentinels table: map it in codeOf and add it here", name, f)
						}
					}
				}
			}
		}
	}
	if found != len(sentinels) {
		t.Errorf("found %d sentinels in the sources, the table has %d", found, len(sentinels))
	}
}

func TestCodeOfChains(t *testing.T) {
	// Errors as the puller and the service actually build them.
	tests := []struct {
		name string
		err  error
		code codes.Code
	}{
		{"unknown", errors.New("something broke"), codes.Internal},
		{"wrapped unknown", fmt.Errorf("x: %w", io.EOF), codes.Internal},
		{"errno", syscall.EIO, codes.Internal},
		{"registry timeout is Unavailable",
			&puller.Error{Kind: puller.ErrUnavailable, Image: img, Msg: "did not answer in time", Cause: context.DeadlineExceeded},
			codes.Unavailable},
		{"registry cancelled is Unavailable",
			&puller.Error{Kind: puller.ErrUnavailable, Image: img, Msg: "cancelled", Cause: context.Canceled},
			codes.Unavailable},
		{"pull pending with the caller's deadline",
			&node.Error{Kind: node.ErrPullPending, Image: img, Msg: "still in progress", Cause: context.Canceled},
			codes.DeadlineExceeded},
		{"full disk from the store",
			&node.Error{Kind: node.ErrNoSpace, Image: img, Msg: "disk is full", Cause: &fsError{syscall.ENOSPC}},
			codes.ResourceExhausted},
		{"digest mismatch in flight",
			&puller.Error{Kind: puller.ErrUnavailable, Image: img, Msg: "did not match its digest", Cause: errors.New("mismatched digest")},
			codes.Unavailable},
		{"bomb",
			&puller.Error{Kind: puller.ErrTooLarge, Image: img, Msg: "expands past"},
			codes.FailedPrecondition},
		{"conflict wrapped",
			fmt.Errorf("publish: %w", &node.Error{Kind: node.ErrVolumeConflict, Image: img, Msg: "already published"}),
			codes.AlreadyExists},
	}
	for _, tt := range tests {
		if got := codeOf(tt.err); got != tt.code {
			t.Errorf("%s: codeOf(%v) = %v, want %v", tt.name, tt.err, got, tt.code)
		}
	}
}

type fsError struct{ errno syscall.Errno }

func (e *fsError) Error() string { return "write /store: " + e.errno.Error() }
func (e *fsError) Unwrap() error { return e.errno }

func TestToStatus(t *testing.T) {
	if toStatus(nil) != nil {
		t.Error("toStatus(nil) != nil")
	}
	// A domain error: its code, and its whole message, naming the image.
	err := &puller.Error{Kind: puller.ErrNotFound, Image: img, Msg: "resolving 1: not found in ghcr.io"}
	st, ok := status.FromError(toStatus(err))
	if !ok || st.Code() != codes.NotFound || st.Message() != "image ghcr.io/acme/x:1: resolving 1: not found in ghcr.io" {
		t.Errorf("toStatus = %v %q", st.Code(), st.Message())
	}
	ne := &node.Error{Kind: node.ErrNoSpace, Image: img, Msg: "disk is full", Cause: syscall.ENOSPC}
	st, _ = status.FromError(toStatus(ne))
	if st.Code() != codes.ResourceExhausted || st.Message() != ne.Error() {
		t.Errorf("toStatus(node error) = %v %q", st.Code(), st.Message())
	}
	// An existing status is kept as it is, code and message.
	for _, in := range []error{
		status.Error(codes.NotFound, "volume gone"),
		status.Error(codes.InvalidArgument, "bad"),
		status.Error(codes.Internal, "image x: "+puller.ErrNotFound.Error()),
	} {
		out := toStatus(in)
		if out != in {
			t.Errorf("toStatus(%v) = %v, want the same error", in, out)
		}
	}
	// A plain error is Internal with its message.
	st, _ = status.FromError(toStatus(errors.New("boom")))
	if st.Code() != codes.Internal || st.Message() != "boom" {
		t.Errorf("toStatus(plain) = %v %q", st.Code(), st.Message())
	}
	// Context errors.
	if c := status.Code(toStatus(context.DeadlineExceeded)); c != codes.DeadlineExceeded {
		t.Errorf("toStatus(DeadlineExceeded) = %v", c)
	}
	if c := status.Code(toStatus(fmt.Errorf("x: %w", context.Canceled))); c != codes.Canceled {
		t.Errorf("toStatus(Canceled) = %v", c)
	}
}
