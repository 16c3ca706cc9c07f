// Package crash kills the real wasm-csi-driver with SIGKILL at random points
// of pulls, publishes and unpublishes, many times, restarts it, and checks
// that nothing it promised was lost: the store is consistent (every blob
// matches its digest, no partial or temp file, every tag record names a
// stored module), every earlier mount still serves its module, read-only,
// the records cover every mount, and every later publish works.
//
// The run is random but replayable: the seed is logged at the start and is
// taken from WASM_CSI_CRASH_SEED when set (WASM_CSI_CRASH_ROUNDS sets the
// number of rounds; WASM_CSI_CRASH_LOG names a file to write the daemon's
// log to). The kill points also depend on scheduling, so a replay
// takes the same decisions, not necessarily the same interleavings.
//
// Needs: root (real mounts) and distribution's registry (bin/registry).
package crash

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

const (
	// defaultRounds of kill and restart; about 1-2 s each on 2 cores.
	defaultRounds = 25
	// maxKillDelay is the longest the daemon runs before its kill.
	maxKillDelay = 300 * time.Millisecond
	// trickleChunk and trickleDelay pace blob downloads (about 16 MiB/s)
	// so that a pull of a few MiB is under way when the kill lands.
	trickleChunk = 64 << 10
	trickleDelay = 4 * time.Millisecond
	// callTimeout bounds one CSI call.
	callTimeout = 60 * time.Second
)

// image is one image pushed to the registry.
type image struct {
	ref    string // as pods name it: through the proxy
	module digest.Digest
	size   int
}

// volState is what the test knows of a volume.
type volState int

const (
	// published: the last call on it, a publish, succeeded.
	published volState = iota
	// unknown: the last call on it was cut by the kill; kubelet retries it.
	unknown
	// gone: an unpublish succeeded.
	gone
)

// volume is one pod's volume, as kubelet tracks it.
type volume struct {
	req   *csipb.NodePublishVolumeRequest
	img   *image
	file  string
	state volState
	// cutPublish says an unknown volume's cut call was a publish (else an
	// unpublish); podDeleted says kubelet will unpublish rather than retry
	// the publish.
	cutPublish, podDeleted bool
}

// crashTest is one run.
type crashTest struct {
	t       *testing.T
	rng     *rand.Rand
	reg     *registrytest.Registry
	d       *harness.Daemon
	k       *harness.Kubelet
	images  []*image
	byRef   map[string]*image
	volumes []*volume
	pods    int
}

func TestCrash(t *testing.T) {
	harness.RequireRoot(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("WASM_CSI_CRASH_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("WASM_CSI_CRASH_SEED=%q: %v", s, err)
		}
		seed = v
	}
	rounds := defaultRounds
	if testing.Short() {
		rounds = 5
	}
	if s := os.Getenv("WASM_CSI_CRASH_ROUNDS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			t.Fatalf("WASM_CSI_CRASH_ROUNDS=%q is not a positive number", s)
		}
		rounds = v
	}
	t.Logf("seed %d, %d rounds (replay: WASM_CSI_CRASH_SEED=%d WASM_CSI_CRASH_ROUNDS=%d)", seed, rounds, seed, rounds)

	start := time.Now()
	bin, err := harness.BuildDriver(t.TempDir(), true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built the daemon in %v", time.Since(start).Round(time.Millisecond))
	c := &crashTest{t: t, rng: rand.New(rand.NewPCG(seed, 0x5eed)), byRef: map[string]*image{}}
	c.reg = registrytest.StartT(t, registrytest.Options{})
	c.reg.SetInterceptor(trickle)
	c.k = harness.NewKubelet(t)
	t.Cleanup(func() { unmountUnder(t, c.k.Root) })
	t.Cleanup(func() {
		if p := os.Getenv("WASM_CSI_CRASH_LOG"); p != "" && c.d != nil {
			if err := os.WriteFile(p, []byte(c.d.Logs()), 0o644); err != nil {
				t.Error(err)
			}
		}
		if c.d != nil && strings.Contains(c.d.Logs(), "WARNING: DATA RACE") {
			t.Errorf("the race detector reported a data race in the daemon:\n%s", c.d.Logs())
		}
	})
	c.d = harness.StartDaemon(t, bin, harness.DaemonOptions{Args: []string{"--insecure-registry=" + c.reg.ProxyHost()}})

	// A few images of every kind of layout, small and a few MiB.
	c.push("base-small-cncf", 0, registrytest.LayoutCNCF)
	c.push("base-small-docker", 0, registrytest.LayoutDockerGzip)
	c.push("base-big-cncf", 3<<20, registrytest.LayoutCNCF)
	c.push("base-big-tar", 2<<20, registrytest.LayoutOCITar)
	c.push("base-mid-zstd", 256<<10, registrytest.LayoutOCIZstd)

	for round := range rounds {
		c.round(round)
		if t.Failed() {
			t.Fatalf("round %d failed (seed %d)", round, seed)
		}
	}

	// kubelet settles everything: retries what was cut, then every pod
	// goes away.
	c.settle()
	var wg sync.WaitGroup
	for _, v := range c.volumes {
		if v.state == published {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := c.unpublish(v); err != nil {
					t.Errorf("final unpublish of %s: %v", v.req.TargetPath, err)
					return
				}
				v.state = gone
				c.checkGone(v.req.TargetPath)
			}()
		}
	}
	wg.Wait()
	c.checkInvariants("end")
	if recs := c.volumeRecords(); len(recs) != 0 {
		t.Errorf("%d volume records left after every volume was unpublished: %+v", len(recs), recs)
	}
	if m := c.mountsUnderKubelet(); len(m) != 0 {
		t.Errorf("mounts left after every volume was unpublished: %v", m)
	}
	t.Logf("%d rounds (a kill each), %d images, %d volumes", rounds, len(c.images), len(c.volumes))
}

// trickle paces blob downloads through the proxy.
func trickle(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			w = &trickleWriter{ResponseWriter: w, r: r}
		}
		next.ServeHTTP(w, r)
	})
}

type trickleWriter struct {
	http.ResponseWriter
	r *http.Request
}

func (tw *trickleWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		c := min(len(p), trickleChunk)
		m, err := tw.ResponseWriter.Write(p[:c])
		n += m
		if err != nil {
			return n, err
		}
		_ = http.NewResponseController(tw.ResponseWriter).Flush()
		p = p[c:]
		select {
		case <-time.After(trickleDelay):
		case <-tw.r.Context().Done():
			return n, tw.r.Context().Err()
		}
	}
	return n, nil
}

// push pushes a new module (padded to size bytes when size > 0) as
// name:1 and remembers it.
func (c *crashTest) push(name string, size int, layout registrytest.Layout) *image {
	c.t.Helper()
	mod := wasmgen.ProxyWasm(wasmgen.Options{Message: "crash test " + name, PadTo: size})
	repoTag := "crash/" + name + ":1"
	if _, err := registrytest.PushWasm(context.Background(), c.reg.Host()+"/"+repoTag, mod, layout); err != nil {
		c.t.Fatalf("pushing %s: %v", repoTag, err)
	}
	img := &image{ref: c.reg.ProxyHost() + "/" + repoTag, module: digest.FromBytes(mod), size: len(mod)}
	c.images = append(c.images, img)
	c.byRef[img.ref] = img
	return img
}

// newVolume builds kubelet's request for a new pod's volume of img.
func (c *crashTest) newVolume(img *image) *volume {
	c.t.Helper()
	c.pods++
	attrs := map[string]string{"image": img.ref}
	file := "plugin.wasm"
	switch c.rng.IntN(5) {
	case 0:
		file = "filter.wasm"
		attrs["fileName"] = file
	case 1:
		attrs["pullPolicy"] = "Always"
	}
	req, err := c.k.PublishRequest(harness.NewPod(fmt.Sprintf("pod-%d", c.pods)), "wasm", attrs)
	if err != nil {
		c.t.Fatal(err)
	}
	v := &volume{req: req, img: img, file: file, state: unknown, cutPublish: true}
	c.volumes = append(c.volumes, v)
	return v
}

func (c *crashTest) publish(v *volume) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := c.d.Node.NodePublishVolume(ctx, v.req)
	return err
}

func (c *crashTest) unpublish(v *volume) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := c.d.Node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: v.req.VolumeId, TargetPath: v.req.TargetPath})
	return err
}

// op is one call of a round.
type op struct {
	v       *volume
	publish bool
}

// round runs a random mix of calls, kills the daemon at a random point,
// restarts it and checks everything.
func (c *crashTest) round(n int) {
	t := c.t
	// New images, so that pulls are under way when the kill lands.
	// Big ones are not compressed: compressing MiBs under the race
	// detector takes seconds.
	big := []registrytest.Layout{registrytest.LayoutCNCF, registrytest.LayoutWasmToOCI, registrytest.LayoutSolo, registrytest.LayoutOCITar}
	small := append(big, registrytest.LayoutDockerGzip, registrytest.LayoutOCIZstd, registrytest.LayoutSoloWithConfig)
	tp := time.Now()
	fresh := []*image{
		c.push(fmt.Sprintf("round%d-big", n), (1<<20)+c.rng.IntN(3<<20), big[c.rng.IntN(len(big))]),
		c.push(fmt.Sprintf("round%d-small", n), 0, small[c.rng.IntN(len(small))]),
	}
	t.Logf("round %d: pushed in %v", n, time.Since(tp).Round(time.Millisecond))

	var ops []op
	busy := map[*volume]bool{}
	// kubelet's retries of the calls the last kill cut.
	for _, v := range c.volumes {
		if v.state == unknown {
			ops = append(ops, op{v: v, publish: v.cutPublish && !v.podDeleted})
			busy[v] = true
		}
	}
	// New pods of the new images (two of the big one: one pull, joined).
	for _, img := range append(fresh, fresh[0]) {
		ops = append(ops, op{v: c.newVolume(img), publish: true})
	}
	// New pods of older images (no download, unless Always finds a new
	// manifest), and pods going away.
	for range 2 + c.rng.IntN(5) {
		ops = append(ops, op{v: c.newVolume(c.images[c.rng.IntN(len(c.images))]), publish: true})
	}
	var live []*volume
	for _, v := range c.volumes {
		if v.state == published && !busy[v] {
			live = append(live, v)
		}
	}
	c.rng.Shuffle(len(live), func(i, j int) { live[i], live[j] = live[j], live[i] })
	for _, v := range live[:min(len(live), 1+c.rng.IntN(4))] {
		ops = append(ops, op{v: v, publish: false})
	}
	c.rng.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })
	// Half the kills land in the first tenth of the window, where the
	// publishes and unpublishes that need no download are still running.
	window := maxKillDelay
	if c.rng.IntN(2) == 0 {
		window /= 10
	}
	killAfter := time.Duration(c.rng.Int64N(int64(window)))
	// Decided now, so that the seed replays them: which pods are deleted
	// if their publish is cut.
	deleted, cleaned := make([]bool, len(ops)), make([]bool, len(ops))
	for i := range deleted {
		deleted[i] = c.rng.IntN(4) == 0
		cleaned[i] = c.rng.IntN(2) == 0
	}

	var killed atomic.Bool
	errs := make([]error, len(ops))
	early := make([]bool, len(ops)) // failed before the kill
	var wg sync.WaitGroup
	for i, o := range ops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if o.publish {
				errs[i] = c.publish(o.v)
			} else {
				errs[i] = c.unpublish(o.v)
			}
			early[i] = errs[i] != nil && !killed.Load()
		}()
	}
	time.Sleep(killAfter)
	killed.Store(true)
	c.d.Kill()
	wg.Wait()

	cut := 0
	for i, o := range ops {
		switch {
		case early[i]:
			t.Errorf("round %d: %s of %s failed before the kill: %v", n, opName(o), o.v.img.ref, errs[i])
			o.v.state, o.v.cutPublish = unknown, o.publish
		case errs[i] != nil:
			cut++
			o.v.state, o.v.cutPublish, o.v.podDeleted = unknown, o.publish, deleted[i]
		case o.publish:
			o.v.state = published
		default:
			o.v.state = gone
		}
	}
	// While the daemon is down, kubelet cleans up some deleted pods whose
	// volume is not mounted, and never calls again: the restart must
	// forget their records.
	for i, o := range ops {
		v := o.v
		if v.state != unknown || !v.podDeleted || !v.cutPublish || !cleaned[i] {
			continue
		}
		if opts, err := harness.MountOptions(v.req.TargetPath); err != nil || opts != "" {
			continue
		}
		podDir := filepath.Dir(filepath.Dir(filepath.Dir(filepath.Dir(v.req.TargetPath))))
		if err := os.RemoveAll(podDir); err != nil {
			t.Fatal(err)
		}
		v.state = gone
	}

	t0 := time.Now()
	if err := c.d.Start(); err != nil {
		t.Fatalf("round %d: restart: %v", n, err)
	}
	t1 := time.Now()
	c.checkInvariants(fmt.Sprintf("round %d", n))
	t2 := time.Now()
	c.batch(n)
	t.Logf("round %d: %d calls, kill after %v, %d cut; restart %v, checks %v, batch of %d publishes %v", n, len(ops), killAfter.Round(time.Millisecond), cut,
		t1.Sub(t0).Round(time.Millisecond), t2.Sub(t1).Round(time.Millisecond), len(c.images), time.Since(t2).Round(time.Millisecond))
}

func opName(o op) string {
	if o.publish {
		return "publish"
	}
	return "unpublish"
}

// settle retries every cut call until it succeeds, as kubelet does, with
// no kill.
func (c *crashTest) settle() {
	for _, v := range c.volumes {
		if v.state != unknown {
			continue
		}
		if v.cutPublish && !v.podDeleted {
			if err := c.publish(v); err != nil {
				c.t.Errorf("retried publish of %s: %v", v.req.TargetPath, err)
				continue
			}
			v.state = published
			c.checkServes(v.req.TargetPath, v.file, v.img)
			continue
		}
		if err := c.unpublish(v); err != nil {
			c.t.Errorf("unpublish of %s: %v", v.req.TargetPath, err)
			continue
		}
		v.state = gone
		c.checkGone(v.req.TargetPath)
	}
}

// batch publishes a new pod's volume of every image, checks each serves
// its module, and unpublishes them all.
func (c *crashTest) batch(n int) {
	t := c.t
	vols := make([]*volume, len(c.images))
	for i, img := range c.images {
		vols[i] = c.newVolume(img)
	}
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for _, v := range vols {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := c.publish(v); err != nil {
				t.Errorf("round %d: publish after the restart of %s: %v", n, v.img.ref, err)
				return
			}
			v.state = published
			c.checkServes(v.req.TargetPath, v.file, v.img)
			if err := c.unpublish(v); err != nil {
				t.Errorf("round %d: unpublish after the restart of %s: %v", n, v.img.ref, err)
				return
			}
			v.state = gone
			c.checkGone(v.req.TargetPath)
		}()
	}
	wg.Wait()
}

// checkServes asserts target is a read-only mount serving img's module as file.
func (c *crashTest) checkServes(target, file string, img *image) {
	c.t.Helper()
	got, n, err := hashFile(filepath.Join(target, file))
	if err != nil {
		c.t.Errorf("%s: reading the module: %v", target, err)
		return
	}
	if got != img.module {
		c.t.Errorf("%s serves %d bytes with digest %s; %s is %d bytes with digest %s", target, n, got, img.ref, img.size, img.module)
	}
	opts, err := harness.MountOptions(target)
	if err != nil {
		c.t.Error(err)
		return
	}
	for _, want := range []string{"ro", "nosuid", "nodev"} {
		if !slices.Contains(strings.Split(opts, ","), want) {
			c.t.Errorf("%s is mounted %q, without %s", target, opts, want)
		}
	}
}

// checkGone asserts target is neither mounted nor present.
func (c *crashTest) checkGone(target string) {
	c.t.Helper()
	if opts, _ := harness.MountOptions(target); opts != "" {
		c.t.Errorf("%s is still mounted (%s) after its unpublish", target, opts)
	}
	if _, err := os.Lstat(target); !errors.Is(err, os.ErrNotExist) {
		c.t.Errorf("%s is still there after its unpublish (lstat: %v)", target, err)
	}
}

// fileID names one version of a file's content: stored modules are
// immutable, and any write to one would change its mtime and ctime.
type fileID struct {
	dev, ino, size uint64
	mtime, ctime   unix.Timespec
}

var (
	hashMu    sync.Mutex
	hashCache = map[fileID]digest.Digest{}
)

// hashFile returns the sha256 of the file at p (through a mount or not)
// and its size. A file already hashed, unchanged since, is not read again:
// a mount serves the very inode of its stored module.
func hashFile(p string) (digest.Digest, int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return "", 0, err
	}
	id := fileID{dev: st.Dev, ino: st.Ino, size: uint64(st.Size), mtime: st.Mtim, ctime: st.Ctim}
	hashMu.Lock()
	d, ok := hashCache[id]
	hashMu.Unlock()
	if ok {
		return d, st.Size, nil
	}
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", n, err
	}
	d = digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(h.Sum(nil)))
	if n == st.Size {
		hashMu.Lock()
		hashCache[id] = d
		hashMu.Unlock()
	}
	return d, n, nil
}

// volumeRecord and refRecord are the fields of the daemon's records the
// test reads from disk.
type volumeRecord struct {
	VolumeID   string        `json:"volumeID"`
	TargetPath string        `json:"targetPath"`
	Image      string        `json:"image"`
	FileName   string        `json:"fileName"`
	Module     digest.Digest `json:"module"`
}

type refRecord struct {
	Ref    string        `json:"ref"`
	Module digest.Digest `json:"module"`
	Size   int64         `json:"size"`
}

func (c *crashTest) volumeRecords() []volumeRecord {
	c.t.Helper()
	dir := filepath.Join(c.d.Root, "volumes")
	entries, err := os.ReadDir(dir)
	if err != nil {
		c.t.Fatal(err)
	}
	var out []volumeRecord
	for _, e := range entries {
		var rec volumeRecord
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err == nil {
			err = json.Unmarshal(b, &rec)
		}
		if err != nil {
			c.t.Errorf("volume record %s: %v", e.Name(), err)
			continue
		}
		out = append(out, rec)
	}
	return out
}

// mountsUnderKubelet maps every mount point under the kubelet root to the
// number of mounts stacked on it.
func (c *crashTest) mountsUnderKubelet() map[string]int {
	c.t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		c.t.Fatal(err)
	}
	out := map[string]int{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], c.k.Root+"/") {
			out[f[4]]++
		}
	}
	return out
}

// checkInvariants checks the store, the records and the mounts once the
// daemon has (re)started and before any call is made.
func (c *crashTest) checkInvariants(when string) {
	t := c.t
	t.Helper()
	root := c.d.Root

	// No temp file anywhere: they are removed before the daemon serves.
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if strings.HasPrefix(d.Name(), ".tmp-") {
			t.Errorf("%s: temp file %s left in the store after the start", when, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// No download is in flight at start: the records of pulls the kill
	// cut (what inspect lists) are gone with their temp files.
	if left, err := os.ReadDir(filepath.Join(root, "pulls")); err != nil || len(left) != 0 {
		t.Errorf("%s: pulls/ after the start: %v, %v", when, left, err)
	}

	// Every blob is named by the sha256 of its bytes: nothing partial.
	blobDir := filepath.Join(root, "blobs", "sha256")
	entries, err := os.ReadDir(blobDir)
	if err != nil {
		t.Fatal(err)
	}
	sizes := map[digest.Digest]int64{}
	for _, e := range entries {
		got, n, err := hashFile(filepath.Join(blobDir, e.Name()))
		if err != nil {
			t.Errorf("%s: blob %s: %v", when, e.Name(), err)
			continue
		}
		if got.Encoded() != e.Name() {
			t.Errorf("%s: blobs/sha256/%s holds %d bytes whose digest is %s", when, e.Name(), n, got)
		}
		sizes[got] = n
	}

	// Every tag record names a stored module, of the size it says.
	refDir := filepath.Join(root, "refs")
	refs, err := os.ReadDir(refDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range refs {
		var rec refRecord
		b, err := os.ReadFile(filepath.Join(refDir, e.Name()))
		if err == nil {
			err = json.Unmarshal(b, &rec)
		}
		if err != nil {
			t.Errorf("%s: tag record %s: %v", when, e.Name(), err)
			continue
		}
		n, ok := sizes[rec.Module]
		switch {
		case !ok:
			t.Errorf("%s: tag record of %s names module %s, which is not stored", when, rec.Ref, rec.Module)
		case n != rec.Size:
			t.Errorf("%s: tag record of %s says %d bytes, module %s has %d", when, rec.Ref, rec.Size, rec.Module, n)
		}
		if img := c.byRef[rec.Ref]; img != nil && img.module != rec.Module {
			t.Errorf("%s: tag record of %s names module %s, the image holds %s", when, rec.Ref, rec.Module, img.module)
		}
	}

	// Every volume record is of a volume kubelet has not seen unpublished,
	// and names its image's module; where its target is mounted, the
	// mount serves that module read-only.
	mounts := c.mountsUnderKubelet()
	byTarget := map[string]*volume{}
	for _, v := range c.volumes {
		byTarget[v.req.TargetPath] = v
	}
	recorded := map[string]bool{}
	for _, rec := range c.volumeRecords() {
		recorded[rec.TargetPath] = true
		v := byTarget[rec.TargetPath]
		if v == nil || v.req.VolumeId != rec.VolumeID {
			t.Errorf("%s: volume record %s at %s is of no volume kubelet published", when, rec.VolumeID, rec.TargetPath)
			continue
		}
		if v.state == gone {
			t.Errorf("%s: volume %s at %s was unpublished, and its record is back", when, rec.VolumeID, rec.TargetPath)
		}
		if rec.Image != v.img.ref || rec.Module != v.img.module {
			t.Errorf("%s: volume record at %s says %s (%s), kubelet asked for %s (%s)", when, rec.TargetPath, rec.Image, rec.Module, v.img.ref, v.img.module)
		}
		if mounts[rec.TargetPath] > 0 {
			c.checkServes(rec.TargetPath, rec.FileName, v.img)
		}
	}
	// Every mount under the kubelet root is one of the daemon's records
	// (records are written before a mount and removed after its unmount),
	// made once.
	for target, n := range mounts {
		if !recorded[target] {
			t.Errorf("%s: %s is mounted and the daemon has no record of it", when, target)
		}
		if n > 1 {
			t.Errorf("%s: %d mounts stacked on %s", when, n, target)
		}
	}
	// Every volume whose publish succeeded still serves its module, and
	// is recorded, so its module's use is counted; every volume whose
	// unpublish succeeded is gone.
	for _, v := range c.volumes {
		switch v.state {
		case published:
			if mounts[v.req.TargetPath] == 0 {
				t.Errorf("%s: %s was published and is no longer mounted", when, v.req.TargetPath)
				continue
			}
			if !recorded[v.req.TargetPath] {
				t.Errorf("%s: %s is published and has no volume record", when, v.req.TargetPath)
			}
			c.checkServes(v.req.TargetPath, v.file, v.img)
		case gone:
			if mounts[v.req.TargetPath] > 0 {
				t.Errorf("%s: %s was unpublished and is mounted", when, v.req.TargetPath)
			}
		}
	}
}

// unmountUnder detaches every mount at or below dir.
func unmountUnder(t *testing.T, dir string) {
	if err := harness.UnmountUnder(dir); err != nil {
		t.Errorf("cleanup: %v", err)
	}
}
