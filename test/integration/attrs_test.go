package integration

import (
	"os"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// TestSHA256Pin checks the sha256 volume attribute: a match in either form
// publishes, a mismatch is FailedPrecondition, a malformed pin
// InvalidArgument.
func TestSHA256Pin(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	repo := repoName(t, "m")
	img := image(repo + ":1.0")
	mod := module(t, "1")
	// A container image: the pin is of the module's bytes, not of a layer.
	push(t, repo+":1.0", mod, registrytest.LayoutOCIGzip)
	sum := digest.FromBytes(mod)

	for _, pin := range []string{sum.Encoded(), sum.String()} {
		req := e.mustPublish(img, map[string]string{"sha256": pin})
		checkFile(t, req, "plugin.wasm", mod)
		e.mustUnpublish(req)
	}

	wrong := digest.FromBytes(module(t, "other"))
	for _, pin := range []string{wrong.Encoded(), wrong.String()} {
		req := e.request(harness.NewPod("wrong-pin"), "filter", map[string]string{"image": img, "sha256": pin})
		wantCode(t, e.publish(req), codes.FailedPrecondition, img, wrong.Encoded(), sum.Encoded())
		checkGone(t, req.TargetPath)
	}

	for _, pin := range []string{
		"abc",
		"sha256:abc",
		strings.ToUpper(sum.Encoded()),
		"sha512:" + sum.Encoded() + sum.Encoded(),
		"md5:" + sum.Encoded(),
		sum.Encoded() + "00",
		"sha256:" + strings.Repeat("g", 64),
	} {
		req := e.request(harness.NewPod("bad-pin"), "filter", map[string]string{"image": img, "sha256": pin})
		wantCode(t, e.publish(req), codes.InvalidArgument, img, "sha256")
		checkGone(t, req.TargetPath)
	}
}

// TestFileName checks the fileName volume attribute.
func TestFileName(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	repo := repoName(t, "m")
	img := image(repo + ":1.0")
	mod := module(t, "1")
	push(t, repo+":1.0", mod, registrytest.LayoutCNCF)

	req := e.mustPublish(img, map[string]string{"fileName": "header.wasm"})
	checkFile(t, req, "header.wasm", mod)
	entries, err := os.ReadDir(req.TargetPath)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "header.wasm" {
		t.Errorf("the volume holds %v, want only header.wasm", entries)
	}
	e.mustUnpublish(req)
	checkGone(t, req.TargetPath)

	for _, name := range []string{"", ".", "..", "a/b", "/plugin.wasm", "../plugin.wasm"} {
		req := e.request(harness.NewPod("bad-name"), "filter", map[string]string{"image": img, "fileName": name})
		wantCode(t, e.publish(req), codes.InvalidArgument, img, "fileName")
		checkGone(t, req.TargetPath)
	}
}
