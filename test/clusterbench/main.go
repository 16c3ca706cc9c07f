// Command clusterbench is wasm-csi's cluster benchmark (`make bench-cluster`):
// on the one-node cluster of test/e2e/cluster.sh (a real kubelet and
// containerd), it starts gateway pods (test/tools/gateway) that load the same
// proxy-wasm module delivered in each of the ways people use today, and
// measures what each way costs the pod and the node:
//
//	baseline         (a) the gateway with no module at all
//	init             (b) an init container whose image holds the module copies
//	                     it into an emptyDir (image pulled by the runtime,
//	                     IfNotPresent)
//	imagevol-docker  (c) an image volume (volumes[].image) of the module's
//	                     Docker-format image
//	imagevol-cncf    (c') an image volume of the same module as a CNCF Wasm
//	                     artifact (one application/wasm layer)
//	csi-docker       (d) a wasm-csi volume of the Docker-format image
//	csi-cncf         (d) a wasm-csi volume of the CNCF artifact
//
// Every way pulls from the same local registry (distribution's, behind
// test/lib/registrytest's counting proxy): the driver through its config, the
// runtime through a hosts.toml the benchmark writes into containerd's
// certs.d. For each module size, each N (pods created at once) and each way,
// a repetition is a cold run (the runtime's images and content of the
// benchmark and the driver's store emptied first) followed by a warm one (the
// same pods again, everything cached). Per run it records, for every pod, the
// time from its creation to Ready (a watch) and to the gateway's "started"
// log line (the runtime's log timestamp), and checks the sha256 every
// gateway reports against the module's; for the run: registry requests and
// bytes served, disk bytes the node gained (the runtime's content and
// snapshots, the pods' directories with their emptyDirs, the driver's
// store), and CPU seconds of kubelet, containerd (and its shims) and the
// driver's pod. A pod that does not start is reported with why, never
// dropped.
//
// It prints a table of medians over the repetitions with their spread
// (min-max), and writes runs.csv (one row per run), pods.csv (one row per
// pod), summary.csv, machine.txt and a chart (clusterbench.png) into -out.
//
// Run as root, against a cluster that test/e2e/cluster.sh brought up with the
// driver installed (test/clusterbench/run.sh does both and tears down).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// config is everything the flags set.
type config struct {
	kubeconfig     string
	node           string
	binDir         string // kubectl, ctr, registry
	stateDir       string // test/e2e/cluster.sh's $STATE
	runDir         string // test/e2e/cluster.sh's $RUN
	kubeletDir     string
	storeDir       string
	outDir         string
	counts         []int
	sizes          []int64
	reps           int
	ways           []way
	modes          []string
	timeout        time.Duration
	keepNamespace  bool
	driverSelector string
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "clusterbench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "clusterbench:", err)
		os.Exit(1)
	}
}

func parseFlags(args []string) (config, error) {
	fs := flag.NewFlagSet("clusterbench", flag.ContinueOnError)
	var c config
	fs.StringVar(&c.kubeconfig, "kubeconfig", "/var/lib/wasm-csi-e2e/pki/admin.kubeconfig", "the e2e cluster's admin kubeconfig")
	fs.StringVar(&c.node, "node", "wasm-csi-e2e", "the node's name")
	fs.StringVar(&c.binDir, "bin", "bin", "directory holding ctr and registry (make tools; test/e2e/cluster.sh)")
	fs.StringVar(&c.stateDir, "state", "/var/lib/wasm-csi-e2e", "test/e2e/cluster.sh's state directory (containerd's root and certs.d are in it)")
	fs.StringVar(&c.runDir, "run", "/run/wasm-csi-e2e", "test/e2e/cluster.sh's run directory (pid files, containerd's socket)")
	fs.StringVar(&c.kubeletDir, "kubelet-dir", "/var/lib/kubelet", "kubelet's root directory")
	fs.StringVar(&c.storeDir, "store", "/var/lib/wasm-csi", "the driver's store on the node")
	fs.StringVar(&c.outDir, "out", "bin/clusterbench", "where to write the CSV files and the chart")
	fs.StringVar(&c.driverSelector, "driver-selector", "app.kubernetes.io/name=wasm-csi", "label selector of the driver's pods in namespace wasm-csi")
	counts := fs.String("n", "1,10,30", "numbers of pods created at once, comma-separated")
	sizes := fs.String("sizes", "1Mi,32Mi", "module sizes, comma-separated (Ki, Mi suffixes)")
	ways := fs.String("ways", strings.Join(wayKeys(), ","), "ways to deliver the module, comma-separated")
	modes := fs.String("modes", "cold,warm", "cold, warm or both: a repetition runs its cold run, then its warm one")
	fs.IntVar(&c.reps, "reps", 3, "repetitions of each (size, N, way)")
	fs.DurationVar(&c.timeout, "timeout", 5*time.Minute, "how long one run waits for its pods")
	fs.BoolVar(&c.keepNamespace, "keep-namespace", false, "leave the benchmark's namespace behind (debugging)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var err error
	if c.counts, err = parseInts(*counts); err != nil {
		return c, fmt.Errorf("-n: %w", err)
	}
	if c.sizes, err = parseSizes(*sizes); err != nil {
		return c, fmt.Errorf("-sizes: %w", err)
	}
	if c.ways, err = parseWays(*ways); err != nil {
		return c, fmt.Errorf("-ways: %w", err)
	}
	for _, m := range strings.Split(*modes, ",") {
		m = strings.TrimSpace(m)
		if m != modeCold && m != modeWarm {
			return c, fmt.Errorf("-modes: %q is neither cold nor warm", m)
		}
		c.modes = append(c.modes, m)
	}
	if c.reps < 1 {
		return c, errors.New("-reps must be at least 1")
	}
	for _, p := range []*string{&c.binDir, &c.outDir} {
		if *p, err = filepath.Abs(*p); err != nil {
			return c, err
		}
	}
	return c, nil
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// parseSizes reads sizes like 1Mi, 512Ki, 4096.
func parseSizes(s string) ([]int64, error) {
	var out []int64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		mult := int64(1)
		switch {
		case strings.HasSuffix(f, "Mi"):
			mult, f = 1<<20, strings.TrimSuffix(f, "Mi")
		case strings.HasSuffix(f, "Ki"):
			mult, f = 1<<10, strings.TrimSuffix(f, "Ki")
		}
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a size (e.g. 1Mi, 512Ki)", f)
		}
		out = append(out, n*mult)
	}
	return out, nil
}

// sizeLabel prints a size as the flags take it.
func sizeLabel(n int64) string {
	switch {
	case n%(1<<20) == 0:
		return fmt.Sprintf("%dMi", n>>20)
	case n%(1<<10) == 0:
		return fmt.Sprintf("%dKi", n>>10)
	}
	return strconv.FormatInt(n, 10)
}
