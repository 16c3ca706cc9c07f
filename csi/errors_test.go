package csi

import (
	"context"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/imagematch"
)

const img = "ghcr.io/acme/x:1"

// forms returns kind as the code sees it: bare, in an *errdefs.Error with
// and without an image and a cause, and wrapped again with %w.
func forms(kind error) map[string]error {
	e := &errdefs.Error{Kind: kind, Image: img, Msg: "m"}
	return map[string]error{
		"bare":                   kind,
		"%w":                     fmt.Errorf("publishing: %w", kind),
		"errdefs.Error":          e,
		"errdefs.Error+cause":    &errdefs.Error{Kind: kind, Image: img, Msg: "m", Cause: io.ErrUnexpectedEOF},
		"%w errdefs.Error":       fmt.Errorf("pull: %w", e),
		"errdefs.Error no image": &errdefs.Error{Kind: kind, Msg: "m"},
		"errdefs.Error+errno":    &errdefs.Error{Kind: kind, Msg: "m", Cause: syscall.EIO},
		"%w %w errdefs.Error":    fmt.Errorf("a: %w", fmt.Errorf("b: %w", e)),
		// A host failure (ErrInternal) caused by a domain error takes
		// the cause's code: ErrInternal is only the fallback.
		"ErrInternal caused by it": &errdefs.Error{Kind: errdefs.ErrInternal, Image: img, Msg: "m", Cause: e},
		"errors.Join":              errors.Join(errors.New("other"), kind),
		"errdefs.Error in chain":   &errdefs.Error{Kind: kind, Image: img, Msg: "m", Cause: errors.New("x")},
	}
}

// sentinels is every exported Err* of package errdefs, and the code the
// README's "Status codes" table gives it.
type codeCase struct {
	name string
	kind error
	code codes.Code
}

var sentinels = []codeCase{
	{"errdefs.ErrInvalidReference", errdefs.ErrInvalidReference, codes.InvalidArgument},
	{"errdefs.ErrInvalidArgument", errdefs.ErrInvalidArgument, codes.InvalidArgument},
	{"errdefs.ErrBlockedAddress", errdefs.ErrBlockedAddress, codes.InvalidArgument},
	{"errdefs.ErrNotFound", errdefs.ErrNotFound, codes.NotFound},
	{"errdefs.ErrUnauthorized", errdefs.ErrUnauthorized, codes.PermissionDenied},
	{"errdefs.ErrRegistryBlocked", errdefs.ErrRegistryBlocked, codes.PermissionDenied},
	{"errdefs.ErrUnavailable", errdefs.ErrUnavailable, codes.Unavailable},
	{"errdefs.ErrPullPending", errdefs.ErrPullPending, codes.DeadlineExceeded},
	{"errdefs.ErrUnsupportedImage", errdefs.ErrUnsupportedImage, codes.FailedPrecondition},
	{"errdefs.ErrInvalidModule", errdefs.ErrInvalidModule, codes.FailedPrecondition},
	{"errdefs.ErrTooLarge", errdefs.ErrTooLarge, codes.FailedPrecondition},
	{"errdefs.ErrDigestMismatch", errdefs.ErrDigestMismatch, codes.FailedPrecondition},
	{"errdefs.ErrNotPresent", errdefs.ErrNotPresent, codes.FailedPrecondition},
	{"errdefs.ErrNotVerified", errdefs.ErrNotVerified, codes.FailedPrecondition},
	{"errdefs.ErrVolumeConflict", errdefs.ErrVolumeConflict, codes.AlreadyExists},
	{"errdefs.ErrNoSpace", errdefs.ErrNoSpace, codes.ResourceExhausted},
	{"errdefs.ErrInternal", errdefs.ErrInternal, codes.Internal},
	{"errdefs.ErrNotAllowed", errdefs.ErrNotAllowed, codes.PermissionDenied},
	{"errdefs.ErrConfigInvalid", errdefs.ErrConfigInvalid, codes.FailedPrecondition},
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

// notFromCalls are sentinels no CSI call returns as its error's kind, so
// they need no code of their own:
//   - imagematch.ErrInvalidPattern comes only from loading the config file
//     (registries.allowed and verification policy patterns, in
//     config.FileConfig and Service.Reconfigure). A call sees it only when
//     the file was refused at start, as the cause of an ErrConfigInvalid
//     refusal (node's TestRefusedConfigPatternReachesPublishAsCause);
//     TestExemptOnlyAsCause checks that the kind decides the code then.
//   - errdefs.ErrStoreFormat comes only from store.Open and
//     store.OpenReadOnly: at start (the driver does not start on a store it
//     cannot read) and in `wasm-csi-driver inspect`. No call opens the store.
var notFromCalls = []string{
	"imagematch.ErrInvalidPattern",
	"errdefs.ErrStoreFormat",
}

// TestExemptOnlyAsCause: a config refused at start because of a bad
// pattern fails publishes with ErrConfigInvalid's code, the pattern error
// being its cause.
func TestExemptOnlyAsCause(t *testing.T) {
	cause := fmt.Errorf("registries.allowed[0]: %w", imagematch.ErrInvalidPattern)
	err := errdefs.New(errdefs.ErrConfigInvalid, img, cause, "the driver's config file was refused at start")
	if got := codeOf(err); got != codes.FailedPrecondition {
		t.Errorf("codeOf(ErrConfigInvalid caused by ErrInvalidPattern) = %v, want %v", got, codes.FailedPrecondition)
	}
}

// TestSentinelsCovered fails when the driver's sources gain an exported
// sentinel that the table above (and so, likely, codeOf) does not know:
// errdefs's must each have a row, and a sentinel declared in another
// package is an error unless notFromCalls lists it.
func TestSentinelsCovered(t *testing.T) {
	known := map[string]bool{}
	for _, s := range sentinels {
		known[s.name] = true
	}
	exempt := map[string]bool{}
	for _, n := range notFromCalls {
		exempt[n] = true
	}
	found, files := 0, 0
	for _, top := range []string{"cmd", "csi", "node", "puller"} {
		err := filepath.WalkDir(filepath.Join("..", top), func(f string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(f, ".go") || strings.HasSuffix(f, "_test.go") {
				return err
			}
			files++
			af, err := parser.ParseFile(token.NewFileSet(), f, nil, 0)
			if err != nil {
				return err
			}
			for _, decl := range af.Decls {
				gd, ok := decl.(*ast.GenDecl)
				if !ok || gd.Tok != token.VAR {
					continue
				}
				for _, spec := range gd.Specs {
					for _, id := range spec.(*ast.ValueSpec).Names {
						if !strings.HasPrefix(id.Name, "Err") || !id.IsExported() {
							continue
						}
						name := af.Name.Name + "." + id.Name
						if exempt[name] {
							continue
						}
						found++
						if !known[name] {
							t.Errorf("%s (in %s) has no row in the sentinels table: declare it in errdefs, map it in codeOf and add it here", name, f)
						}
					}
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if files == 0 {
		t.Fatal("no sources found")
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
			&errdefs.Error{Kind: errdefs.ErrUnavailable, Image: img, Msg: "did not answer in time", Cause: context.DeadlineExceeded},
			codes.Unavailable},
		{"registry cancelled is Unavailable",
			&errdefs.Error{Kind: errdefs.ErrUnavailable, Image: img, Msg: "cancelled", Cause: context.Canceled},
			codes.Unavailable},
		{"pull pending with the caller's deadline",
			&errdefs.Error{Kind: errdefs.ErrPullPending, Image: img, Msg: "still in progress", Cause: context.Canceled},
			codes.DeadlineExceeded},
		{"full disk from the store",
			&errdefs.Error{Kind: errdefs.ErrNoSpace, Image: img, Msg: "disk is full", Cause: &fsError{syscall.ENOSPC}},
			codes.ResourceExhausted},
		{"digest mismatch in flight",
			&errdefs.Error{Kind: errdefs.ErrUnavailable, Image: img, Msg: "did not match its digest", Cause: errors.New("mismatched digest")},
			codes.Unavailable},
		{"bomb",
			&errdefs.Error{Kind: errdefs.ErrTooLarge, Image: img, Msg: "expands past"},
			codes.FailedPrecondition},
		{"conflict wrapped",
			fmt.Errorf("publish: %w", &errdefs.Error{Kind: errdefs.ErrVolumeConflict, Image: img, Msg: "already published"}),
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
	err := &errdefs.Error{Kind: errdefs.ErrNotFound, Image: img, Msg: "resolving 1: not found in ghcr.io"}
	st, ok := status.FromError(toStatus(err))
	if !ok || st.Code() != codes.NotFound || st.Message() != "image ghcr.io/acme/x:1: resolving 1: not found in ghcr.io" {
		t.Errorf("toStatus = %v %q", st.Code(), st.Message())
	}
	ne := &errdefs.Error{Kind: errdefs.ErrNoSpace, Image: img, Msg: "disk is full", Cause: syscall.ENOSPC}
	st, _ = status.FromError(toStatus(ne))
	if st.Code() != codes.ResourceExhausted || st.Message() != ne.Error() {
		t.Errorf("toStatus(node error) = %v %q", st.Code(), st.Message())
	}
	// An existing status is kept as it is, code and message.
	for _, in := range []error{
		status.Error(codes.NotFound, "volume gone"),
		status.Error(codes.InvalidArgument, "bad"),
		status.Error(codes.Internal, "image x: "+errdefs.ErrNotFound.Error()),
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
