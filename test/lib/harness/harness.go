// Package harness runs the real wasm-csi-driver binary for tests and calls
// it over its unix socket the way kubelet does. It provides: building the
// driver (BuildDriver, with or without the race detector) and the test
// credential plugin (BuildCredentialPlugin, test/tools/credplugin); starting,
// killing and restarting a daemon on its own root dir (StartDaemon, Daemon);
// kubelet-shaped publish requests and pod directories (Kubelet, Pod);
// what `inspect` lists of a daemon's store (Daemon.Inventory); reading a
// mount's options (MountOptions), unmounting what a test left
// (UnmountUnder); RepoRoot, FreePort, and RequireRoot for the suites that
// mount. It needs the Go toolchain; the daemons it starts need root.
package harness

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/test/lib/testlog"
)

// RepoRoot finds the repository's root: the first directory above the
// working directory whose go.mod declares this module (test/kube/tools has
// a go.mod of its own).
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil &&
			bytes.Contains(b, []byte("module github.com/wasm-csi/wasm-csi\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("the wasm-csi repository is not above the working directory")
		}
		dir = parent
	}
}

// FreePort returns a TCP port free on 127.0.0.1 at the time of the call.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// BuildDriver builds the daemon into dir and returns the binary's path.
// Without race it is built as the Makefile and the image build it (static,
// CGO_ENABLED=0, -trimpath), so that benchmarks measure the binary that
// ships: a cgo build links libc dynamically and idled at 43.5 MiB resident
// where the static one idled at 31.5. With race it has the race detector,
// which needs cgo.
func BuildDriver(dir string, race bool) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "wasm-csi-driver")
	args := []string{"build", "-o", out}
	env := os.Environ()
	if race {
		args = append(args, "-race")
	} else {
		args = append(args, "-trimpath")
		env = append(env, "CGO_ENABLED=0")
	}
	args = append(args, "./cmd/wasm-csi-driver")
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	cmd.Env = env
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, b)
	}
	return out, nil
}

// BuildCredentialPlugin builds test/tools/credplugin, a kubelet credential
// provider plugin for the tests, into dir and returns the binary's path.
func BuildCredentialPlugin(dir string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "credplugin")
	cmd := exec.Command("go", "build", "-o", out, "./test/tools/credplugin")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, b)
	}
	return out, nil
}

// RequireRoot fails under CI and skips elsewhere when not root: the suites
// make real mounts.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("this suite makes real mounts and must run as root")
	}
	t.Skip("needs root for real mounts")
}

// Daemon is a running wasm-csi-driver process.
type Daemon struct {
	Bin    string
	Root   string
	Socket string
	Args   []string
	Env    []string

	mu       sync.Mutex
	cmd      *exec.Cmd
	logs     *testlog.Buffer
	conn     *grpc.ClientConn
	Node     csipb.NodeClient
	Identity csipb.IdentityClient
}

// DaemonOptions are extra flags for the daemon.
type DaemonOptions struct {
	// Root is the --root-dir; a temp dir when empty.
	Root string
	// Args are more flags, e.g. --insecure-registry=HOST.
	Args []string
	// Env are more environment variables (KEY=value) over the test's own.
	Env []string
}

// StartDaemon starts the daemon and waits until it answers Probe. It is
// killed when the test ends.
func StartDaemon(t testing.TB, bin string, opts DaemonOptions) *Daemon {
	t.Helper()
	dir := t.TempDir()
	root := opts.Root
	if root == "" {
		root = filepath.Join(dir, "store")
	}
	d := &Daemon{
		Bin:    bin,
		Root:   root,
		Socket: filepath.Join(dir, "csi.sock"),
		Args:   opts.Args,
		Env:    opts.Env,
	}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Stop()
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.Logs())
		}
		// The store holds the modules' read-only overlay mounts.
		if err := UnmountUnder(filepath.Join(d.Root, "ro")); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return d
}

// UnmountUnder detaches every mount at or below dir, deepest (latest) first.
func UnmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			points = append(points, f[4])
		}
	}
	var errs []error
	for i := len(points) - 1; i >= 0; i-- {
		if err := syscall.Unmount(points[i], syscall.MNT_DETACH); err != nil && err != syscall.EINVAL && err != syscall.ENOENT {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", points[i], err))
		}
	}
	return errors.Join(errs...)
}

// Start starts (or restarts) the process with the same flags.
func (d *Daemon) Start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.logs == nil {
		d.logs = &testlog.Buffer{}
	}
	args := append([]string{
		"--endpoint=unix://" + d.Socket,
		"--node-id=test-node",
		"--root-dir=" + d.Root,
		"--metrics-address=127.0.0.1:0",
		"--log-level=debug",
	}, d.Args...)
	cmd := exec.Command(d.Bin, args...)
	if len(d.Env) > 0 {
		// os/exec keeps the last value of a key given twice.
		cmd.Env = append(os.Environ(), d.Env...)
	}
	cmd.Stdout = d.logs
	cmd.Stderr = d.logs
	if err := cmd.Start(); err != nil {
		return err
	}
	d.cmd = cmd
	// Retry the connection quickly while the daemon starts: gRPC's default
	// first backoff (1s) would add most of a second to every (re)start.
	conn, err := grpc.NewClient("unix://"+d.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: 5 * time.Second,
		}))
	if err != nil {
		return err
	}
	d.conn = conn
	d.Node = csipb.NewNodeClient(conn)
	d.Identity = csipb.NewIdentityClient(conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := d.Identity.Probe(ctx, &csipb.ProbeRequest{})
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon did not answer Probe in 30s: %v\n%s", err, d.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Kill sends SIGKILL and waits for the process to go.
func (d *Daemon) Kill() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	_ = d.cmd.Wait()
	d.cmd = nil
	d.conn.Close()
}

// Stop sends SIGTERM and waits, killing after 10s.
func (d *Daemon) Stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Signal(syscall.SIGKILL)
		<-done
	}
	d.cmd = nil
	d.conn.Close()
}

// Pid is the process id, or 0 when not running.
func (d *Daemon) Pid() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Inventory runs `wasm-csi-driver inspect -o json` on the daemon's
// --root-dir (beside the daemon, which may be running), with the config
// defaults (no --config file), and returns what it lists.
func (d *Daemon) Inventory(t testing.TB) store.Inventory {
	t.Helper()
	out, err := exec.Command(d.Bin, "inspect", "--root-dir="+d.Root, "--config="+filepath.Join(d.Root, "no-config.yaml"), "-o", "json").Output()
	if err != nil {
		t.Fatalf("inspect: %v", err)
	}
	var inv store.Inventory
	if err := json.Unmarshal(out, &inv); err != nil {
		t.Fatalf("inspect -o json: %v\n%s", err, out)
	}
	return inv
}

// MetricsURL is the daemon's metrics and health endpoint base URL
// ("http://127.0.0.1:PORT"), read from its "serving" log line.
func (d *Daemon) MetricsURL() (string, error) {
	re := regexp.MustCompile(`"metrics":"([^"]+)"`)
	m := re.FindAllStringSubmatch(d.Logs(), -1)
	if len(m) == 0 {
		return "", fmt.Errorf("the daemon has not logged its metrics address")
	}
	return "http://" + m[len(m)-1][1], nil
}

// Logs is everything the daemon wrote so far.
func (d *Daemon) Logs() string { return d.logs.String() }

// Kubelet lays out a kubelet-like pods tree and builds the requests kubelet
// sends for inline ephemeral volumes.
type Kubelet struct {
	Root string
}

// NewKubelet makes a kubelet root in a temp dir.
func NewKubelet(t testing.TB) *Kubelet {
	return &Kubelet{Root: t.TempDir()}
}

// Pod is a pod kubelet is setting up.
type Pod struct {
	Name, Namespace, UID, ServiceAccount string
}

// NewPod returns a pod with a fresh UID.
func NewPod(name string) Pod {
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s-%d", name, time.Now().UnixNano())))
	h := hex.EncodeToString(sum[:16])
	uid := h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
	return Pod{Name: name, Namespace: "default", UID: uid, ServiceAccount: "default"}
}

// PublishRequest builds the NodePublishVolume kubelet sends for volume
// volName of pod with the given attributes, creating the target's parent
// as kubelet does.
func (k *Kubelet) PublishRequest(pod Pod, volName string, attrs map[string]string) (*csipb.NodePublishVolumeRequest, error) {
	target := filepath.Join(k.Root, "pods", pod.UID, "volumes", "kubernetes.io~csi", volName, "mount")
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return nil, err
	}
	vc := map[string]string{
		"csi.storage.k8s.io/ephemeral":           "true",
		"csi.storage.k8s.io/pod.name":            pod.Name,
		"csi.storage.k8s.io/pod.namespace":       pod.Namespace,
		"csi.storage.k8s.io/pod.uid":             pod.UID,
		"csi.storage.k8s.io/serviceAccount.name": pod.ServiceAccount,
	}
	for k, v := range attrs {
		vc[k] = v
	}
	// kubelet names ephemeral volumes csi-<sha256 of pod uid and volume name>.
	sum := sha256.Sum256([]byte(pod.UID + "/" + volName))
	return &csipb.NodePublishVolumeRequest{
		VolumeId:   "csi-" + hex.EncodeToString(sum[:]),
		TargetPath: target,
		VolumeCapability: &csipb.VolumeCapability{
			AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		Readonly:      true,
		VolumeContext: vc,
	}, nil
}

// MountOptions returns the per-mount options of target from
// /proc/self/mountinfo (e.g. "ro,nosuid,nodev,relatime"), or "" if not mounted.
func MountOptions(target string) (string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	opts := ""
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 5 && f[4] == target {
			opts = f[5] // the last mount stacked on target wins
		}
	}
	return opts, nil
}
