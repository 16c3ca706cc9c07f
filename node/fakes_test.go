package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/test/lib/testlog"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// The fakes below stand in for the registry, the mounts and the Kubernetes
// API so that the Service's own logic (joining pulls, access checks, mirror
// order, damping, rollback, GC against publishes) runs in-process, as any
// user, against a real store in a temp directory. What they fake is tested
// for real elsewhere: the puller against a real registry, mounts and the
// whole daemon as root in test/integration.

// fakeImage is one image the fake registry serves, under any registry host
// (mirrors serve the same repositories).
type fakeImage struct {
	body     []byte
	manifest digest.Digest
	// user, when set, is the only username the registry accepts for it.
	user string
}

// fakeRegistry is the state shared by every fakePuller a Service makes
// (one per Reconfigure).
type fakeRegistry struct {
	mu     sync.Mutex
	images map[string]fakeImage // by repository
	down   map[string]bool      // registry hosts that answer Unavailable
	// resolves lists the registry host of every ResolveWith, in order.
	resolves []string
	// pulls counts downloads; pulling, if set, receives one value when a
	// download starts, and release, if set, holds it until closed.
	pulls   int
	pulling chan struct{}
	release chan struct{}
	// resolveGate, if set, holds every ResolveWith until closed;
	// resolving counts those held.
	resolveGate chan struct{}
	resolving   int
	// halfway, if set, receives one value when a download has written
	// half of its module, which then waits for resume to be closed.
	halfway chan struct{}
	resume  chan struct{}
}

func newFakeRegistry() *fakeRegistry {
	return &fakeRegistry{images: map[string]fakeImage{}, down: map[string]bool{}}
}

// add serves a valid proxy-wasm module at repo; user "" makes it public.
func (r *fakeRegistry) add(repo, user string) fakeImage {
	body := wasmgen.ProxyWasm(wasmgen.Options{Message: repo})
	img := fakeImage{body: body, manifest: digest.FromString("manifest of " + repo), user: user}
	r.mu.Lock()
	r.images[repo] = img
	r.mu.Unlock()
	return img
}

func (r *fakeRegistry) pullCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pulls
}

// resolvingNow is the number of ResolveWith calls in progress.
func (r *fakeRegistry) resolvingNow() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.resolving
}

func (r *fakeRegistry) resolveHosts() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.resolves...)
}

// fakePuller implements Puller over a fakeRegistry, with the mirrors of
// the puller.Config the Service gave it.
type fakePuller struct {
	reg     *fakeRegistry
	mirrors map[string][]string
}

func (p *fakePuller) Attempts(_ context.Context, ref puller.Reference, keyrings ...*puller.Keyring) ([]puller.Credential, error) {
	var out []puller.Credential
	for _, k := range keyrings {
		out = append(out, k.Lookup(ref)...)
	}
	return append(out, puller.Credential{Source: "anonymous"}), nil
}

func (p *fakePuller) ResolveWith(_ context.Context, ref puller.Reference, attempts []puller.Credential) (ocispec.Descriptor, puller.Credential, error) {
	r := p.reg
	r.mu.Lock()
	gate := r.resolveGate
	r.resolving++
	r.mu.Unlock()
	if gate != nil {
		<-gate
	}
	r.mu.Lock()
	r.resolving--
	defer r.mu.Unlock()
	r.resolves = append(r.resolves, ref.Registry)
	if r.down[ref.Registry] {
		return ocispec.Descriptor{}, puller.Credential{}, errdefs.New(errdefs.ErrUnavailable, ref.Original, nil, "%s is down", ref.Registry)
	}
	img, ok := r.images[ref.Repository]
	if !ok || (ref.Digest != "" && ref.Digest != img.manifest) {
		return ocispec.Descriptor{}, puller.Credential{}, errdefs.New(errdefs.ErrNotFound, ref.Original, nil, "no %s in %s", ref.Repository, ref.Registry)
	}
	for _, a := range attempts {
		if img.user == "" || a.Cred.Username == img.user {
			return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: img.manifest, Size: 100}, a, nil
		}
	}
	return ocispec.Descriptor{}, puller.Credential{}, errdefs.New(errdefs.ErrUnauthorized, ref.Original, nil, "%s refused every credential tried", ref.Registry)
}

func (p *fakePuller) Pull(ctx context.Context, ref puller.Reference, desc ocispec.Descriptor, sink puller.Sink, _ puller.Credential) (puller.Module, error) {
	r := p.reg
	r.mu.Lock()
	r.pulls++
	img, ok := r.images[ref.Repository]
	pulling, release, halfway, resume := r.pulling, r.release, r.halfway, r.resume
	r.mu.Unlock()
	if pulling != nil {
		pulling <- struct{}{}
	}
	if release != nil {
		select {
		case <-release:
		case <-ctx.Done():
			return puller.Module{}, errdefs.New(errdefs.ErrUnavailable, ref.Original, ctx.Err(), "pull cancelled")
		}
	}
	if !ok || img.manifest != desc.Digest {
		return puller.Module{}, errdefs.New(errdefs.ErrNotFound, ref.Original, nil, "manifest gone")
	}
	// The module is its own layer, read in two halves, as the puller
	// tells a ProgressSink.
	ps, _ := sink.(puller.ProgressSink)
	if ps != nil {
		ps.Started(ocispec.Descriptor{MediaType: "application/wasm", Digest: digest.FromBytes(img.body), Size: int64(len(img.body))})
	}
	half := len(img.body) / 2
	for i, part := range [][]byte{img.body[:half], img.body[half:]} {
		if ps != nil {
			ps.Received(int64(len(part)))
		}
		if _, err := sink.Write(part); err != nil {
			return puller.Module{}, err
		}
		if i == 0 && halfway != nil {
			halfway <- struct{}{}
			<-resume
		}
	}
	return puller.Module{Manifest: desc.Digest, Size: int64(len(img.body)), Layout: puller.LayoutSolo}, nil
}

// SignatureRepository: the fake registry holds no signatures; the unit
// tests run without a verification policy (puller/verify and the
// integration suite test verification against a real registry).
// CloseIdleConnections: the fake keeps no connections.
func (p *fakePuller) CloseIdleConnections() {}

func (p *fakePuller) SignatureRepository(ref puller.Reference, _ puller.Credential) (*remote.Repository, error) {
	return nil, errors.New("fakePuller: no signatures")
}

func (p *fakePuller) Sources(ref puller.Reference) ([]puller.Reference, error) {
	var out []puller.Reference
	for _, m := range p.mirrors[ref.Registry] {
		alt := ref
		alt.Registry = m
		out = append(out, alt)
	}
	return append(out, ref), nil
}

// fakeMounter records mounts instead of making them. It creates nothing
// on disk, as a mount on a missing path would fail.
type fakeMounter struct {
	mu     sync.Mutex
	mounts map[string]string // target -> source
	// failBind, if set, is BindReadOnly's error.
	failBind error
	// onView, if set, runs inside MountReadOnlyView: in the middle of a
	// publish, after the module's use is counted.
	onView func()
}

func newFakeMounter() *fakeMounter { return &fakeMounter{mounts: map[string]string{}} }

func (m *fakeMounter) MountReadOnlyView(dir, _, at string) error {
	m.mu.Lock()
	hook := m.onView
	m.mounts[at] = dir
	m.mu.Unlock()
	if hook != nil {
		hook()
	}
	return nil
}

func (m *fakeMounter) BindReadOnly(src, target string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failBind != nil {
		return &os.PathError{Op: "bind mount " + src + " on", Path: target, Err: m.failBind}
	}
	m.mounts[target] = src
	return nil
}

func (m *fakeMounter) IsMountPoint(p string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.mounts[p]
	return ok, nil
}

func (m *fakeMounter) Unmount(target string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.mounts, target)
	return nil
}

func (m *fakeMounter) EnsureReadOnly(string) (bool, error) { return false, nil }

// source is what is bind-mounted at target, or "".
func (m *fakeMounter) source(target string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mounts[target]
}

// fakeCredentials gives each pod (by name) the keyrings of its secrets.
type fakeCredentials struct {
	mu       sync.Mutex
	keyrings map[string][]*puller.Keyring
}

func (c *fakeCredentials) Keyrings(_ context.Context, pod PodInfo) ([]*puller.Keyring, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.keyrings[pod.Name], nil
}

// secret is a pod pull secret named name for user at registry.
func secret(t *testing.T, name, registry, user string) *puller.Keyring {
	t.Helper()
	js := fmt.Sprintf(`{"auths":{%q:{"username":%q,"password":"pw"}}}`, registry, user)
	k, err := puller.ParseDockerConfigJSON("secret default/"+name, []byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// countingEvents counts Pulling events, so a test knows how many publishes
// have reached the pull.
type countingEvents struct {
	mu       sync.Mutex
	pulling  int
	failed   int
	progress []progressEvent
	changed  chan struct{}
}

type progressEvent struct {
	pod         string
	done, total int64
}

func newCountingEvents() *countingEvents { return &countingEvents{changed: make(chan struct{}, 1000)} }

func (e *countingEvents) Pulling(PodInfo, string) {
	e.mu.Lock()
	e.pulling++
	e.mu.Unlock()
	e.changed <- struct{}{}
}

// WaitingForPullSlot is a Pulling event too: the publish reached the pull.
func (e *countingEvents) WaitingForPullSlot(p PodInfo, image string, _, _ int) {
	e.Pulling(p, image)
}

// PullProgress records each report, by pod name.
func (e *countingEvents) PullProgress(pod PodInfo, _ string, done, total int64) {
	e.mu.Lock()
	e.progress = append(e.progress, progressEvent{pod.Name, done, total})
	e.mu.Unlock()
	e.changed <- struct{}{}
}

func (e *countingEvents) Pulled(PodInfo, string, store.RefRecord, time.Duration) {}
func (e *countingEvents) AlreadyPresent(PodInfo, string, store.RefRecord)        {}
func (e *countingEvents) Failed(PodInfo, string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.failed++
}
func (e *countingEvents) Verified(PodInfo, string, string, string)          {}
func (e *countingEvents) VerificationFailed(PodInfo, string, string, error) {}

// waitFor waits until count() is at least n, counting again after each
// event recorded; what names what is counted, for the failure.
func (e *countingEvents) waitFor(t *testing.T, n int, what string, count func() int) {
	t.Helper()
	for {
		got := count()
		if got >= n {
			return
		}
		select {
		case <-e.changed:
		case <-time.After(time.Minute):
			t.Fatalf("%d of %d %s", got, n, what)
		}
	}
}

// waitPulling waits until n publishes have reached the pull.
func (e *countingEvents) waitPulling(t *testing.T, n int) {
	t.Helper()
	e.waitFor(t, n, "publishes reached the pull", func() int {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.pulling
	})
}

// unitEnv is a Service over a real store in a temp dir, with the fakes.
type unitEnv struct {
	svc    *Service
	reg    *fakeRegistry
	mnt    *fakeMounter
	creds  *fakeCredentials
	events *countingEvents
	root   string
	log    *testlog.Buffer
}

func newUnitEnv(t *testing.T, fc config.FileConfig) *unitEnv {
	t.Helper()
	e := &unitEnv{reg: newFakeRegistry(), mnt: newFakeMounter(), root: t.TempDir(), log: &testlog.Buffer{},
		creds: &fakeCredentials{keyrings: map[string][]*puller.Keyring{}}, events: newCountingEvents()}
	cfg := Config{
		NewPuller:   func(c puller.Config) Puller { return &fakePuller{reg: e.reg, mirrors: c.Mirrors} },
		Credentials: e.creds,
		Events:      e.events,
	}
	svc, err := NewService(cfg, openStore(t, e.root), e.mnt, slog.New(slog.NewTextHandler(e.log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Reconfigure(fc); err != nil {
		t.Fatal(err)
	}
	e.svc = svc
	return e
}

// request is a publish of image for volume id into a fresh target, by pod.
func (e *unitEnv) request(t *testing.T, id, image, pod string, policy PullPolicy) PublishRequest {
	t.Helper()
	// kubelet creates the target's parent; the driver creates the target.
	target := filepath.Join(e.root, "pods", id, "mount")
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		t.Fatal(err)
	}
	return PublishRequest{
		VolumeID: id, TargetPath: target, Image: mustRef(t, image),
		PullPolicy: policy, FileName: DefaultFileName,
		Pod: PodInfo{Name: pod, Namespace: "default", UID: "uid-" + pod},
	}
}

// published checks that req's target is bind-mounted from a view holding
// body, and returns the module's digest.
func (e *unitEnv) published(t *testing.T, req PublishRequest, body []byte) digest.Digest {
	t.Helper()
	view := e.mnt.source(req.TargetPath)
	if view == "" {
		t.Fatalf("%s is not mounted", req.TargetPath)
	}
	// The view is the read-only overlay of a directory holding the module.
	dir := e.mnt.source(view)
	if dir == "" {
		t.Fatalf("view %s of %s is not mounted", view, req.TargetPath)
	}
	f, err := os.Open(filepath.Join(dir, req.FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(body) {
		t.Fatalf("%s serves %d bytes, not the image's %d", req.TargetPath, len(got), len(body))
	}
	rec, ok, err := e.svc.store.GetVolume(req.VolumeID, req.TargetPath)
	if err != nil || !ok {
		t.Fatalf("no volume record for %s: %v", req.VolumeID, err)
	}
	return rec.Module
}

// distinctImages adds n images, acme/<prefix><i>, and returns a publish of
// each, by a pod and into a volume of its own, under policy.
func (e *unitEnv) distinctImages(t *testing.T, prefix string, n int, policy PullPolicy) []PublishRequest {
	t.Helper()
	reqs := make([]PublishRequest, n)
	for i := range reqs {
		e.reg.add(fmt.Sprintf("acme/%s%d", prefix, i), "")
		reqs[i] = e.request(t, fmt.Sprintf("vol-%d", i), fmt.Sprintf("reg.example/acme/%s%d:1", prefix, i), fmt.Sprintf("pod-%d", i), policy)
	}
	return reqs
}

// publishedAll checks that each of reqs serves its own image's module.
func (e *unitEnv) publishedAll(t *testing.T, reqs []PublishRequest) {
	t.Helper()
	for _, req := range reqs {
		e.reg.mu.Lock()
		body := e.reg.images[req.Image.Repository].body
		e.reg.mu.Unlock()
		e.published(t, req, body)
	}
}

func isKind(err, kind error) bool { return err != nil && errors.Is(err, kind) }
