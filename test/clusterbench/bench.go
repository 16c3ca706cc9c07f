package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/wasm-csi/wasm-csi/test/lib/kubenode"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// bench holds what every run uses.
type bench struct {
	cfg       config
	cs        kubernetes.Interface
	ns        string
	reg       *registrytest.Registry
	served    atomic.Int64 // response bytes the registry's proxy sent
	ctr       ctr
	drv       driver
	shimBin   string
	kubelet   int // pids
	cd        int
	driverUID string
	images    map[int64]images
	log       func(format string, args ...any)
}

// runResult is one run: one way, one size, N pods, cold or warm.
type runResult struct {
	size  int64
	way   way
	n     int
	mode  string
	rep   int
	start time.Time
	pods  []podResult
	// wall: from the first create call to the last pod Ready or failed.
	wall                                           time.Duration
	regRequests, regBlobGets                       int
	regBytes                                       int64
	diskRuntime, diskPods, diskStore               int64 // gained during the run
	cpuKubelet, cpuContainerd, cpuShims, cpuDriver float64
	load                                           [2]float64 // 1-minute load average at start and end
	err                                            string     // the run itself went wrong
}

type podResult struct {
	name    string
	ready   time.Duration // creation to Ready; 0 if it did not start
	serving time.Duration // creation to the gateway's "started" line
	failure string        // why not started; "" when it did, with the right module
}

func (r runResult) ok() int {
	n := 0
	for _, p := range r.pods {
		if p.failure == "" {
			n++
		}
	}
	return n
}

func run(ctx context.Context, cfg config) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root: it reads the node's disk and cgroups and empties the runtime between runs")
	}
	if err := os.MkdirAll(cfg.outDir, 0o755); err != nil {
		return err
	}
	rc, err := clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w (is the e2e cluster up? test/e2e/cluster.sh up)", cfg.kubeconfig, err)
	}
	rc.QPS, rc.Burst = 200, 400 // N pods are created at once
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	b := &bench{
		cfg:    cfg,
		cs:     cs,
		ctr:    ctr{bin: filepath.Join(cfg.binDir, "ctr"), sock: filepath.Join(cfg.runDir, "containerd.sock")},
		drv:    driver{cs: cs, node: cfg.node, selector: cfg.driverSelector},
		images: map[int64]images{},
		log: func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "clusterbench: %s "+format+"\n", append([]any{time.Now().UTC().Format("15:04:05")}, args...)...)
		},
	}
	var cdBin string
	if b.kubelet, _, err = pidFile(cfg.runDir, "kubelet"); err != nil {
		return fmt.Errorf("kubelet's pid (test/e2e/cluster.sh's %s): %w", cfg.runDir, err)
	}
	if b.cd, cdBin, err = pidFile(cfg.runDir, "containerd"); err != nil {
		return fmt.Errorf("containerd's pid: %w", err)
	}
	b.shimBin = filepath.Join(filepath.Dir(cdBin), "containerd-shim-runc-v2")

	machine, err := describeMachine(ctx, cs, cfg)
	if err != nil {
		return err
	}
	b.log("machine:\n%s", machine)

	nonce := make([]byte, 3)
	_, _ = rand.Read(nonce)
	b.ns = "clusterbench-" + hex.EncodeToString(nonce)
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: b.ns}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	defer func() {
		if cfg.keepNamespace {
			return
		}
		cctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if err := deletePods(cctx, cs, b.ns, 2*time.Minute); err != nil {
			b.log("cleanup: %v", err)
		}
		_ = cs.CoreV1().Namespaces().Delete(cctx, b.ns, metav1.DeleteOptions{})
	}()
	if err := poll(ctx, time.Minute, "serviceaccount "+b.ns+"/default", func() (bool, string, error) {
		_, err := cs.CoreV1().ServiceAccounts(b.ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, "", err
	}); err != nil {
		return err
	}

	// The driver must be up; its store starts as the benchmark found it.
	if p, err := b.drv.waitReady(ctx); err != nil {
		return fmt.Errorf("the driver is not installed and Ready (kubectl apply -k test/e2e/overlay): %w", err)
	} else {
		b.driverUID = string(p.UID)
	}

	if err := b.startRegistry(ctx); err != nil {
		return err
	}
	defer b.reg.Close()
	defer os.RemoveAll(b.hostsDir())
	for _, size := range cfg.sizes {
		img, err := b.pushModule(ctx, size, hex.EncodeToString(nonce))
		if err != nil {
			return err
		}
		b.images[size] = img
	}

	// One pod first, not measured: the first pod of a fresh kubelet and
	// apiserver pays one-time costs no way should be charged with.
	if w := b.runOnce(ctx, cfg.sizes[0], allWays[0], 1, modeWarm, 0); w.ok() != 1 || w.err != "" {
		return fmt.Errorf("the warm-up pod did not start: %s%s", w.err, failures(w))
	}

	var results []runResult
	total := len(cfg.sizes) * len(cfg.counts) * len(cfg.ways) * cfg.reps * len(cfg.modes)
	started := time.Now()
	i := 0
	// An interrupt stops the runs; what was measured is still reported.
loop:
	for _, size := range cfg.sizes {
		for _, n := range cfg.counts {
			for _, w := range cfg.ways {
				for rep := 1; rep <= cfg.reps; rep++ {
					for _, mode := range cfg.modes {
						i++
						r := b.runOnce(ctx, size, w, n, mode, rep)
						results = append(results, r)
						b.log("[%d/%d, %v] %s N=%d %s %s rep %d: %d/%d started, ready p50 %v p95 %v, registry %d req %s, disk +%s, load %.2f%s",
							i, total, time.Since(started).Round(time.Second), sizeLabel(size), n, w.key, mode, rep,
							r.ok(), n, pct(readyTimes(r), 50), pct(readyTimes(r), 95), r.regRequests, mib(r.regBytes),
							mib(r.diskRuntime+r.diskPods+r.diskStore), r.load[1], failureNote(r))
						if err := writeOutputs(cfg.outDir, machine, results); err != nil {
							return err
						}
						if ctx.Err() != nil {
							b.log("interrupted: reporting the %d runs done", len(results))
							break loop
						}
					}
				}
			}
		}
	}
	sum := summarize(results)
	printTable(os.Stdout, machine, sum)
	printTargets(os.Stdout, sum)
	if err := writeOutputs(cfg.outDir, machine, results); err != nil {
		return err
	}
	if err := writeChart(filepath.Join(cfg.outDir, "clusterbench.png"), sum, machine); err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	b.log("wrote %s/{runs.csv,pods.csv,summary.csv,summary.md,machine.txt,clusterbench.png} in %v", cfg.outDir, time.Since(started).Round(time.Second))
	return ctx.Err()
}

func failureNote(r runResult) string {
	if r.err != "" {
		return "; RUN ERROR: " + r.err
	}
	if f := failures(r); f != "" {
		return "; failed: " + f
	}
	return ""
}

// startRegistry starts the registry and its counting proxy, counts the bytes
// the proxy sends, and tells the runtime to reach the proxy over plain HTTP.
func (b *bench) startRegistry(ctx context.Context) error {
	reg, err := registrytest.Start(ctx, registrytest.Options{Binary: filepath.Join(b.cfg.binDir, "registry")})
	if err != nil {
		return err
	}
	b.reg = reg
	reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			cw := &countingWriter{ResponseWriter: w}
			next.ServeHTTP(cw, r)
			b.served.Add(cw.n)
		})
	})
	host := reg.ProxyHost()
	if err := os.MkdirAll(b.hostsDir(), 0o755); err != nil {
		return err
	}
	// containerd's hosts.toml for the proxy: plain HTTP, pull and resolve.
	toml := fmt.Sprintf("# clusterbench: the benchmark's registry (test/lib/registrytest's counting proxy)\nserver = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", host, host)
	if err := os.WriteFile(filepath.Join(b.hostsDir(), "hosts.toml"), []byte(toml), 0o644); err != nil {
		return err
	}
	b.log("registry %s, its counting proxy %s (containerd: %s)", reg.Host(), host, filepath.Join(b.hostsDir(), "hosts.toml"))
	return nil
}

func (b *bench) hostsDir() string {
	return filepath.Join(b.cfg.stateDir, "containerd", "certs.d", b.reg.ProxyHost())
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// pushModule makes a proxy-wasm module of size bytes unique to this
// benchmark and pushes it as a Docker-format image, a CNCF artifact and an
// init-container image (the copier and the module).
func (b *bench) pushModule(ctx context.Context, size int64, nonce string) (images, error) {
	name := fmt.Sprintf("clusterbench %s %s", nonce, sizeLabel(size))
	mod := registrytest.Module(name, int(size))
	sum := sha256.Sum256(mod)
	repo := "clusterbench/module-" + strings.ToLower(sizeLabel(size))
	img := images{
		docker: b.reg.ProxyHost() + "/" + repo + "-docker:1.0",
		cncf:   b.reg.ProxyHost() + "/" + repo + "-cncf:1.0",
		init:   b.reg.ProxyHost() + "/" + repo + "-init:1.0",
		sha256: hex.EncodeToString(sum[:]),
		size:   size,
	}
	push := func(ref string) string { return strings.Replace(ref, b.reg.ProxyHost(), b.reg.Host(), 1) }
	pctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	if _, err := registrytest.PushWasm(pctx, push(img.docker), mod, registrytest.LayoutDockerGzip); err != nil {
		return img, fmt.Errorf("push %s: %w", img.docker, err)
	}
	if _, err := registrytest.PushWasm(pctx, push(img.cncf), mod, registrytest.LayoutCNCF); err != nil {
		return img, fmt.Errorf("push %s: %w", img.cncf, err)
	}
	cp, err := b.buildCopier(ctx)
	if err != nil {
		return img, err
	}
	// FROM <a base holding cp>; COPY plugin.wasm /: two layers, as docker
	// build makes them.
	if _, err := registrytest.PushContainerImage(pctx, push(img.init), []registrytest.Layer{
		{Entries: []registrytest.TarEntry{{Name: "cp", Body: cp, Mode: 0o755}}, Compression: registrytest.Gzip},
		{Entries: []registrytest.TarEntry{{Name: moduleFile, Body: mod}}, Compression: registrytest.Gzip},
	}, registrytest.WithDockerMediaTypes()); err != nil {
		return img, fmt.Errorf("push %s: %w", img.init, err)
	}
	b.log("module %s: sha256 %s; pushed %s, %s, %s", sizeLabel(size), img.sha256, img.docker, img.cncf, img.init)
	return img, nil
}

// buildCopier builds test/tools/cp, static.
func (b *bench) buildCopier(ctx context.Context) ([]byte, error) {
	dir, err := os.MkdirTemp("", "clusterbench-cp-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "cp")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./test/tools/cp")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if o, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./test/tools/cp (run from the repository's root): %v\n%s", err, o)
	}
	return os.ReadFile(out)
}

// makeCold empties what way w would find cached: the runtime's images of
// the benchmark's registry (content and snapshots with them), or the driver's
// store (the driver is taken off the node meanwhile).
func (b *bench) makeCold(ctx context.Context, w way) error {
	if w.usesRuntimePull() {
		// Kubelet removes the containers of deleted pods shortly after they
		// stop; until then their snapshots keep image layers alive.
		if err := poll(ctx, 2*time.Minute, "containers of deleted pods removed", func() (bool, string, error) {
			ids, err := b.ctr.containersOf(ctx, b.ns)
			return len(ids) == 0, fmt.Sprintf("%d containers left", len(ids)), err
		}); err != nil {
			return err
		}
		if _, err := b.ctr.removeImagesOf(ctx, b.reg.ProxyHost()+"/"); err != nil {
			return err
		}
	}
	if w.usesDriver() {
		if err := b.drv.stop(ctx); err != nil {
			return err
		}
		ents, err := os.ReadDir(b.cfg.storeDir)
		if err != nil {
			return fmt.Errorf("emptying the driver's store: %w", err)
		}
		for _, e := range ents {
			if err := os.RemoveAll(filepath.Join(b.cfg.storeDir, e.Name())); err != nil {
				return fmt.Errorf("emptying the driver's store: %w", err)
			}
		}
		p, err := b.drv.start(ctx)
		if err != nil {
			return err
		}
		b.driverUID = string(p.UID)
	}
	return nil
}

type snapshot struct {
	cpuKubelet, cpuContainerd, cpuDriver float64
	shims                                map[int]float64
	diskRuntime, diskPods, diskStore     int64
	load                                 float64
}

func (b *bench) snap() snapshot {
	var s snapshot
	s.cpuKubelet, _ = procCPU(b.kubelet)
	s.cpuContainerd, _ = procCPU(b.cd)
	if v, err := podCgroupCPU(b.driverUID); err == nil {
		s.cpuDriver = v
	} else {
		b.log("driver CPU: %v", err)
	}
	s.shims = shimsCPU(b.shimBin)
	mounts, err := kubenode.MountPoints()
	if err != nil {
		b.log("mounts: %v", err)
	}
	s.diskRuntime, _ = diskUsage(filepath.Join(b.cfg.stateDir, "containerd", "root"), mounts)
	s.diskPods, _ = diskUsage(filepath.Join(b.cfg.kubeletDir, "pods"), mounts)
	s.diskStore, _ = diskUsage(b.cfg.storeDir, mounts)
	s.load = loadAvg()[0]
	return s
}

// runOnce is one run: N pods of way w created at once, watched until each is
// Ready or certainly not starting, checked, measured and deleted.
func (b *bench) runOnce(ctx context.Context, size int64, w way, n int, mode string, rep int) (r runResult) {
	r = runResult{size: size, way: w, n: n, mode: mode, rep: rep, start: time.Now()}
	if mode == modeCold {
		if err := b.makeCold(ctx, w); err != nil {
			r.err = "making the node cold: " + err.Error()
			return r
		}
	}
	img := b.images[size]
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	t := newTracker()
	watching := make(chan error, 1)
	go watchPods(wctx, b.cs, b.ns, t, watching)
	if err := <-watching; err != nil {
		r.err = "watch: " + err.Error()
		return r
	}

	b.reg.ResetCounts()
	b.served.Store(0)
	before := b.snap()
	names := make([]string, n)
	labels := map[string]string{"app": "clusterbench", "way": w.key}
	var wg sync.WaitGroup
	var createErr atomic.Value
	first := time.Now()
	for i := range names {
		names[i] = fmt.Sprintf("%s-%s-%s-%d-%02d", w.key, strings.ToLower(sizeLabel(size)), mode, rep, i)
		wg.Add(1)
		go func(name string) {
			defer wg.Done()
			_, err := b.cs.CoreV1().Pods(b.ns).Create(ctx, w.pod(b.ns, name, img, labels), metav1.CreateOptions{})
			if err != nil {
				createErr.Store(err)
				return
			}
			t.created(name, time.Now())
		}(names[i])
	}
	wg.Wait()
	if err, _ := createErr.Load().(error); err != nil {
		r.err = "create: " + err.Error()
	}

	// Until every pod is Ready or certainly not starting.
	deadline := time.After(b.cfg.timeout)
	timedOut := false
wait:
	for {
		t.mu.Lock()
		done := 0
		for _, name := range names {
			if o := t.pods[name]; o != nil && (!o.ready.IsZero() || o.failed != "") {
				done++
			}
		}
		t.mu.Unlock()
		if done == n {
			break
		}
		select {
		case <-t.changed:
		case <-deadline:
			timedOut = true
			break wait
		case <-ctx.Done():
			r.err = ctx.Err().Error()
			return r
		}
	}
	r.wall = time.Since(first)
	after := b.snap()
	counts := b.reg.Counts()
	r.regRequests = counts.Requests
	for _, v := range counts.BlobGets {
		r.regBlobGets += v
	}
	r.regBytes = b.served.Load()
	r.diskRuntime = after.diskRuntime - before.diskRuntime
	r.diskPods = after.diskPods - before.diskPods
	r.diskStore = after.diskStore - before.diskStore
	r.cpuKubelet = after.cpuKubelet - before.cpuKubelet
	r.cpuContainerd = after.cpuContainerd - before.cpuContainerd
	r.cpuDriver = after.cpuDriver - before.cpuDriver
	for pid, v := range after.shims {
		r.cpuShims += v - before.shims[pid] // a new shim had 0 before
	}
	r.load = [2]float64{before.load, after.load}

	// Check what each gateway loaded.
	for _, name := range names {
		t.mu.Lock()
		o := *t.get(name)
		t.mu.Unlock()
		pr := podResult{name: name}
		// Ready (all containers running) comes before the gateway has read
		// and compiled its module: wait for its "started" or "error" line.
		g := gatewayLogOf(ctx, b.cs, b.ns, name)
		for wait := time.Now().Add(time.Minute); o.failed == "" && !o.ready.IsZero() && g.started.IsZero() && g.errLine == "" && time.Now().Before(wait); {
			time.Sleep(250 * time.Millisecond)
			g = gatewayLogOf(ctx, b.cs, b.ns, name)
		}
		switch {
		case o.created.IsZero():
			pr.failure = "not created"
		case o.failed != "":
			pr.failure = o.failed
			if g.errLine != "" {
				pr.failure += ": " + g.errLine
			}
		case o.ready.IsZero():
			pr.failure = "timeout: " + o.state
			if timedOut {
				if ev := lastWarning(ctx, b.cs, b.ns, name); ev != "" {
					pr.failure += ": " + ev
				}
			}
		case g.errLine != "":
			pr.failure = "gateway: " + g.errLine
		case g.started.IsZero():
			pr.failure = "gateway logged no start"
		case w.kind != kindBaseline && (g.sha256 != img.sha256 || g.bytes != img.size):
			pr.failure = fmt.Sprintf("loaded sha256=%s bytes=%d, want %s bytes=%d", g.sha256, g.bytes, img.sha256, img.size)
		}
		if pr.failure == "" {
			pr.ready = o.ready.Sub(o.created)
			pr.serving = g.started.Sub(o.created)
		}
		r.pods = append(r.pods, pr)
	}
	if err := deletePods(ctx, b.cs, b.ns, 3*time.Minute); err != nil && r.err == "" {
		r.err = "delete: " + err.Error()
	}
	return r
}

func readyTimes(r runResult) []time.Duration {
	var out []time.Duration
	for _, p := range r.pods {
		if p.failure == "" {
			out = append(out, p.ready)
		}
	}
	return out
}

func servingTimes(r runResult) []time.Duration {
	var out []time.Duration
	for _, p := range r.pods {
		if p.failure == "" {
			out = append(out, p.serving)
		}
	}
	return out
}

// failures groups the failure reasons of a run's pods: "reason (count)".
func failures(r runResult) string {
	m := map[string]int{}
	for _, p := range r.pods {
		if p.failure != "" {
			m[p.failure]++
		}
	}
	var out []string
	for k, v := range m {
		out = append(out, fmt.Sprintf("%s (x%d)", k, v))
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}

func mib(b int64) string { return fmt.Sprintf("%.1fMiB", float64(b)/(1<<20)) }
