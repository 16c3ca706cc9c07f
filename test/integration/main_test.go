// Package integration runs the real wasm-csi-driver binary (built once, with
// the race detector) against a real OCI registry, and calls it over its unix
// socket the way kubelet does for inline ephemeral volumes. The daemon pulls
// through the registry's counting proxy, so every download is counted from
// real traffic.
//
// Needs: root (real mounts), distribution's registry (bin/registry), the
// cosign CLI (bin/cosign) for the signature tests. No apiserver, no cluster.
package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"oras.land/oras-go/v2/content"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

var (
	// driverBin is the daemon, built once with the race detector.
	driverBin string
	// reg is the registry every test pushes to, unless it needs one of its
	// own (authentication). Tests use their own repositories and modules,
	// so counts by blob digest or repository belong to one test, and most
	// tests run in parallel. The tests that install a fault or an
	// interceptor on the shared proxy (TestRegistry5xx, TestCorruptBlob,
	// TestPullOutlivesCaller, TestRestart) are not parallel: Go runs them
	// alone, before the parallel ones.
	reg *registrytest.Registry
)

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "wasm-csi-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if driverBin, err = harness.BuildDriver(dir, true); err != nil {
		fmt.Fprintln(os.Stderr, "building the driver:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	reg, err = registrytest.Start(ctx, registrytest.Options{})
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	if code != 0 {
		fmt.Fprintf(os.Stderr, "tail of the shared registry's log:\n%s\n", reg.LogTail())
	}
	if err := reg.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	return code
}

// callTimeout bounds one CSI call; longer than oras' retries of a 5xx (about 7s).
const callTimeout = 60 * time.Second

// env is one daemon and one kubelet root for a test.
type env struct {
	t *testing.T
	d *harness.Daemon
	k *harness.Kubelet
}

// newEnv starts a daemon that reaches the shared registry's proxy over plain
// HTTP, plus extra flags.
func newEnv(t *testing.T, extra ...string) *env {
	t.Helper()
	return newEnvOpts(t, harness.DaemonOptions{Args: append([]string{"--insecure-registry=" + reg.ProxyHost()}, extra...)})
}

// newEnvOpts starts a daemon with exactly these options.
func newEnvOpts(t *testing.T, opts harness.DaemonOptions) *env {
	t.Helper()
	harness.RequireRoot(t)
	k := newKubelet(t)
	var d *harness.Daemon
	// Registered before StartDaemon's own cleanup, so it runs after the
	// daemon stopped and printed its race detector summary.
	t.Cleanup(func() { checkNoRace(t, d) })
	d = harness.StartDaemon(t, driverBin, opts)
	return &env{t: t, d: d, k: k}
}

// checkNoRace fails the test if the race detector reported in the daemon.
func checkNoRace(t *testing.T, d *harness.Daemon) {
	if d == nil {
		return
	}
	if logs := d.Logs(); strings.Contains(logs, "WARNING: DATA RACE") {
		t.Errorf("the race detector reported a data race in the daemon:\n%s", logs)
	}
}

// newKubelet makes a kubelet root whose leftover mounts are undone before
// its directory is removed.
func newKubelet(t *testing.T) *harness.Kubelet {
	k := harness.NewKubelet(t)
	t.Cleanup(func() { unmountUnder(t, k.Root) })
	return k
}

// unmountUnder detaches every mount at or below dir.
func unmountUnder(t *testing.T, dir string) {
	if err := harness.UnmountUnder(dir); err != nil {
		t.Errorf("cleanup: %v", err)
	}
}

// request builds kubelet's NodePublishVolume for volume vol of pod.
func (e *env) request(pod harness.Pod, vol string, attrs map[string]string) *csipb.NodePublishVolumeRequest {
	e.t.Helper()
	req, err := e.k.PublishRequest(pod, vol, attrs)
	if err != nil {
		e.t.Fatal(err)
	}
	return req
}

// publish sends req and returns the call's error.
func (e *env) publish(req *csipb.NodePublishVolumeRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := e.d.Node.NodePublishVolume(ctx, req)
	return err
}

// mustPublish publishes image for a new pod and returns the request.
func (e *env) mustPublish(image string, attrs map[string]string) *csipb.NodePublishVolumeRequest {
	e.t.Helper()
	a := map[string]string{"image": image}
	for k, v := range attrs {
		a[k] = v
	}
	req := e.request(harness.NewPod("pod"), "wasm", a)
	if err := e.publish(req); err != nil {
		e.t.Fatalf("publishing %s: %v", image, err)
	}
	return req
}

// unpublish sends kubelet's NodeUnpublishVolume for req's volume.
func (e *env) unpublish(req *csipb.NodePublishVolumeRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := e.d.Node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: req.TargetPath})
	return err
}

func (e *env) mustUnpublish(req *csipb.NodePublishVolumeRequest) {
	e.t.Helper()
	if err := e.unpublish(req); err != nil {
		e.t.Fatalf("unpublishing %s: %v", req.TargetPath, err)
	}
}

// blobDir is the daemon store's module directory.
func (e *env) blobDir() string { return filepath.Join(e.d.Root, "blobs", "sha256") }

// storedBlobs lists the names in the store's module directory.
func (e *env) storedBlobs() []string {
	e.t.Helper()
	entries, err := os.ReadDir(e.blobDir())
	if err != nil {
		e.t.Fatal(err)
	}
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	sort.Strings(names)
	return names
}

// checkStoreIntegrity checks every file in blobs/sha256 is named by the
// sha256 of its bytes: nothing partial or foreign is stored.
func (e *env) checkStoreIntegrity() {
	e.t.Helper()
	for _, name := range e.storedBlobs() {
		b, err := os.ReadFile(filepath.Join(e.blobDir(), name))
		if err != nil {
			e.t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		if hex.EncodeToString(sum[:]) != name {
			e.t.Errorf("store file blobs/sha256/%s holds %d bytes whose sha256 is %x", name, len(b), sum)
		}
	}
}

// checkFile asserts the volume of req shows exactly want as file name.
func checkFile(t *testing.T, req *csipb.NodePublishVolumeRequest, name string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(req.TargetPath, name))
	if err != nil {
		t.Fatalf("reading the module in the volume: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s in the volume is %d bytes (sha256 %s), want %d bytes (sha256 %s)",
			name, len(got), digest.FromBytes(got), len(want), digest.FromBytes(want))
	}
}

// checkGone asserts target is neither mounted nor present.
func checkGone(t *testing.T, target string) {
	t.Helper()
	opts, err := harness.MountOptions(target)
	if err != nil {
		t.Fatal(err)
	}
	if opts != "" {
		t.Errorf("%s is still mounted (%s)", target, opts)
	}
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		t.Errorf("target %s still exists (lstat: %v)", target, err)
	}
}

// inode returns the device and inode of a file.
func inode(t *testing.T, path string) (uint64, uint64) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Dev, st.Ino
}

// wantCode asserts err is a gRPC status with code and a message that holds
// every one of contains.
func wantCode(t *testing.T, err error, code codes.Code, contains ...string) {
	t.Helper()
	st, ok := status.FromError(err)
	if err == nil || !ok {
		t.Fatalf("got %v, want a %s status", err, code)
	}
	if st.Code() != code {
		t.Fatalf("got %s (%q), want %s", st.Code(), st.Message(), code)
	}
	for _, s := range contains {
		if !strings.Contains(st.Message(), s) {
			t.Errorf("%s message %q does not contain %q", code, st.Message(), s)
		}
	}
}

// repoName turns the test's name into a repository path of its own.
func repoName(t *testing.T, suffix string) string {
	var parts []string
	for _, p := range strings.Split(strings.ToLower(t.Name()+"/"+suffix), "/") {
		var b strings.Builder
		for _, r := range p {
			if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
				b.WriteRune(r)
			} else {
				b.WriteByte('-')
			}
		}
		if s := strings.Trim(b.String(), "-"); s != "" {
			parts = append(parts, s)
		}
	}
	return "it/" + strings.Join(parts, "/")
}

// module is a real proxy-wasm module unique to the test and tag.
func module(t *testing.T, tag string) []byte {
	return wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name() + " " + tag})
}

// push pushes mod to repoTag ("repo:tag") of the shared registry, directly
// (uncounted), and returns the manifest's descriptor.
func push(t *testing.T, repoTag string, mod []byte, layout registrytest.Layout, opts ...registrytest.PushOption) ocispec.Descriptor {
	t.Helper()
	desc, err := registrytest.PushWasm(context.Background(), reg.Host()+"/"+repoTag, mod, layout, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return desc
}

// image is how the daemon names repoTag: through the counting proxy.
func image(repoTag string) string { return reg.ProxyHost() + "/" + repoTag }

// manifestBlobs returns the config and layer digests of the manifest desc
// in repo, read directly from the registry (uncounted).
func manifestBlobs(t *testing.T, repo string, desc ocispec.Descriptor) (config digest.Digest, layers []digest.Digest) {
	t.Helper()
	return manifestBlobsAt(t, reg.Host()+"/"+repo, desc)
}

// manifestBlobsAt is manifestBlobs for a repository reference on any registry.
func manifestBlobsAt(t *testing.T, ref string, desc ocispec.Descriptor) (config digest.Digest, layers []digest.Digest) {
	t.Helper()
	r, err := registrytest.Repository(ref)
	if err != nil {
		t.Fatal(err)
	}
	b, err := content.FetchAll(context.Background(), r, desc)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, l := range m.Layers {
		layers = append(layers, l.Digest)
	}
	return m.Config.Digest, layers
}

// blobGetPath reports whether r is a GET of blob d.
func blobGetPath(r *http.Request, d digest.Digest) bool {
	return r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+d.String())
}

// gate holds requests until it is opened, and says when one arrived.
type gate struct {
	arrived chan struct{}
	open    chan struct{}
	once    sync.Once
	arrOnce sync.Once
}

func newGate(t *testing.T) *gate {
	g := &gate{arrived: make(chan struct{}), open: make(chan struct{})}
	t.Cleanup(g.release)
	return g
}

func (g *gate) release()       { g.once.Do(func() { close(g.open) }) }
func (g *gate) signalArrival() { g.arrOnce.Do(func() { close(g.arrived) }) }

// waitArrival waits until a request reached the gate.
func (g *gate) waitArrival(t *testing.T) {
	t.Helper()
	select {
	case <-g.arrived:
	case <-time.After(callTimeout):
		t.Fatal("the held request never arrived at the registry")
	}
}
