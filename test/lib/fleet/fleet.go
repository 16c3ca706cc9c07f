// Package fleet runs a fleet of wasm-csi "nodes" on this machine, each a
// real daemon with its own root dir, socket and kubelet tree, all pulling
// from one upstream registry, directly or through a pull-through cache
// (distribution's registry in proxy mode). The fleet suite (test/fleet) and
// `make bench` (BenchmarkFleet) use it. Running one needs root.
package fleet

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// Via says how the nodes reach the cache.
type Via string

const (
	// Direct: no cache; every node pulls from the upstream.
	Direct Via = "direct"
	// HostsTOML: the cache is a mirror in containerd's hosts.toml.
	HostsTOML Via = "hosts.toml"
	// ConfigMirrors: the cache is in the config file's registries.mirrors.
	ConfigMirrors Via = "registries.mirrors"
)

// Options configures a fleet.
type Options struct {
	Nodes int
	// Bin is the daemon binary.
	Bin string
	// Upstream is the registry the images are named in.
	Upstream *registrytest.Registry
	// Cache is the pull-through cache (nil with Direct).
	Cache *registrytest.Registry
	Via   Via
	// LogLevel of the daemons (default info).
	LogLevel string
}

// Node is one daemon and its kubelet tree.
type Node struct {
	D *harness.Daemon
	K *harness.Kubelet
}

// Fleet is the running nodes.
type Fleet struct {
	Nodes []*Node
}

// Start starts the nodes, all pointed the same way at the upstream and the
// cache. They are stopped when the test ends.
func Start(t testing.TB, o Options) *Fleet {
	t.Helper()
	dir := t.TempDir()
	up := o.Upstream.ProxyHost()
	var cfg string
	switch o.Via {
	case Direct:
		cfg = "{}\n"
	case HostsTOML:
		certs := filepath.Join(dir, "certs.d")
		i := strings.LastIndex(up, ":")
		hostDir := filepath.Join(certs, up[:i]+"_"+up[i+1:]+"_")
		if err := os.MkdirAll(hostDir, 0o755); err != nil {
			t.Fatal(err)
		}
		body := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", up, o.Cache.ProxyHost())
		if err := os.WriteFile(filepath.Join(hostDir, "hosts.toml"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		cfg = "registries:\n  containerdHostsDir: " + certs + "\n"
	case ConfigMirrors:
		cfg = fmt.Sprintf("registries:\n  insecure: [%q]\n  mirrors:\n    %q: [%q]\n", o.Cache.ProxyHost(), up, o.Cache.ProxyHost())
	default:
		t.Fatalf("fleet: unknown Via %q", o.Via)
	}
	cfgPath := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	level := o.LogLevel
	if level == "" {
		level = "info"
	}
	f := &Fleet{Nodes: make([]*Node, o.Nodes)}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []string
	for i := range f.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := &harness.Daemon{Bin: o.Bin, Root: filepath.Join(dir, fmt.Sprintf("node%02d", i), "store"),
				Socket: filepath.Join(dir, fmt.Sprintf("node%02d", i), "csi.sock"),
				Args:   []string{"--config=" + cfgPath, "--insecure-registry=" + up, "--log-level=" + level, "--node-id=node" + fmt.Sprint(i), "--metrics-address=127.0.0.1:0"}}
			if err := os.MkdirAll(filepath.Dir(d.Socket), 0o755); err != nil {
				mu.Lock()
				errs = append(errs, err.Error())
				mu.Unlock()
				return
			}
			if err := d.Start(); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Sprintf("node %d: %v", i, err))
				mu.Unlock()
				return
			}
			f.Nodes[i] = &Node{D: d, K: &harness.Kubelet{Root: filepath.Join(dir, fmt.Sprintf("node%02d", i), "kubelet")}}
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for i, n := range f.Nodes {
			if n == nil {
				continue
			}
			n.D.Stop()
			if t.Failed() {
				t.Logf("node %d log (tail):\n%s", i, tail(n.D.Logs(), 4096))
			}
			if err := harness.UnmountUnder(n.K.Root); err != nil {
				t.Errorf("cleanup: %v", err)
			}
			if err := harness.UnmountUnder(filepath.Join(n.D.Root, "ro")); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	if len(errs) > 0 {
		t.Fatalf("fleet: %s", strings.Join(errs, "; "))
	}
	return f
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// Result is what one publish saw.
type Result struct {
	Node    int
	Latency time.Duration
	Err     error
}

// Publish publishes image for pods new pods on each of nodes, every publish
// at once, and waits for all of them.
func (f *Fleet) Publish(ctx context.Context, nodes []int, pods int, image string) []Result {
	var wg sync.WaitGroup
	out := make([]Result, len(nodes)*pods)
	start := make(chan struct{})
	for ni, n := range nodes {
		for p := 0; p < pods; p++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := &out[ni*pods+p]
				r.Node = n
				node := f.Nodes[n]
				req, err := node.K.PublishRequest(harness.NewPod(fmt.Sprintf("n%d-p%d", n, p)), "filter", map[string]string{"image": image})
				if err != nil {
					r.Err = err
					return
				}
				<-start
				t0 := time.Now()
				cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
				defer cancel()
				_, err = node.D.Node.NodePublishVolume(cctx, req)
				r.Latency, r.Err = time.Since(t0), err
				if err == nil {
					err = checkModule(req)
				}
				if r.Err == nil {
					r.Err = err
				}
			}()
		}
	}
	close(start)
	wg.Wait()
	return out
}

func checkModule(req *csipb.NodePublishVolumeRequest) error {
	b, err := os.ReadFile(filepath.Join(req.TargetPath, "plugin.wasm"))
	if err != nil {
		return err
	}
	if len(b) < 8 || string(b[:4]) != "\x00asm" {
		return fmt.Errorf("%s is not a Wasm module", req.TargetPath)
	}
	return nil
}

// Nodes returns the indexes from..to-1.
func Nodes(from, to int) []int {
	var out []int
	for i := from; i < to; i++ {
		out = append(out, i)
	}
	return out
}

// Errors returns the failed results' errors.
func Errors(rs []Result) []string {
	var out []string
	for _, r := range rs {
		if r.Err != nil {
			out = append(out, fmt.Sprintf("node %d: %v", r.Node, r.Err))
		}
	}
	return out
}

// Percentile returns the p-th percentile (0..100) of the latencies of rs
// (nearest rank).
func Percentile(rs []Result, p float64) time.Duration {
	var ds []time.Duration
	for _, r := range rs {
		if r.Err == nil {
			ds = append(ds, r.Latency)
		}
	}
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	i := int(p/100*float64(len(ds))+0.999999) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(ds) {
		i = len(ds) - 1
	}
	return ds[i]
}
