package main

import (
	"context"
	"encoding/csv"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// pct is the p-th percentile of ds by nearest rank (the smallest value with
// at least p% of the values at or below it); 0 for no values.
func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	k := int(math.Ceil(p/100*float64(len(s)))) - 1
	if k < 0 {
		k = 0
	}
	return s[k]
}

// spread is the median of a figure over repetitions, with its min and max.
type spread struct {
	med, min, max float64
	n             int // repetitions that had a value
}

func spreadOf(v []float64) spread {
	if len(v) == 0 {
		return spread{}
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return spread{med: med, min: s[0], max: s[len(s)-1], n: len(s)}
}

// group is the repetitions of one (size, N, way, mode).
type group struct {
	size int64
	n    int
	way  way
	mode string
	runs []runResult

	readyP50, readyP95, servingP50                 spread // seconds, over repetitions where pods started
	regRequests, regBlobGets                       spread
	regBytes                                       spread
	disk, diskRuntime, diskPods, diskStore         spread
	cpuKubelet, cpuContainerd, cpuShims, cpuDriver spread
	started, pods                                  int // pods started with the right module, of pods
	failures                                       string
	load                                           [2]float64 // min and max 1-minute load seen
}

func summarize(results []runResult) []group {
	var groups []group
	idx := map[string]int{}
	for _, r := range results {
		k := fmt.Sprintf("%d/%d/%s/%s", r.size, r.n, r.way.key, r.mode)
		i, ok := idx[k]
		if !ok {
			i = len(groups)
			idx[k] = i
			groups = append(groups, group{size: r.size, n: r.n, way: r.way, mode: r.mode})
		}
		groups[i].runs = append(groups[i].runs, r)
	}
	for i := range groups {
		g := &groups[i]
		var p50, p95, s50, req, blobs, bytes, disk, dr, dp, ds, ck, cc, csh, cd []float64
		fails := map[string]int{}
		g.load = [2]float64{math.Inf(1), 0}
		for _, r := range g.runs {
			g.pods += r.n
			g.started += r.ok()
			for _, l := range r.load {
				g.load[0] = math.Min(g.load[0], l)
				g.load[1] = math.Max(g.load[1], l)
			}
			if r.err != "" {
				fails["run error: "+r.err]++
				continue
			}
			for _, p := range r.pods {
				if p.failure != "" {
					fails[shortFailure(p.failure)]++
				}
			}
			if rt := readyTimes(r); len(rt) > 0 {
				p50 = append(p50, pct(rt, 50).Seconds())
				p95 = append(p95, pct(rt, 95).Seconds())
				s50 = append(s50, pct(servingTimes(r), 50).Seconds())
			}
			req = append(req, float64(r.regRequests))
			blobs = append(blobs, float64(r.regBlobGets))
			bytes = append(bytes, float64(r.regBytes))
			disk = append(disk, float64(r.diskRuntime+r.diskPods+r.diskStore))
			dr = append(dr, float64(r.diskRuntime))
			dp = append(dp, float64(r.diskPods))
			ds = append(ds, float64(r.diskStore))
			ck = append(ck, r.cpuKubelet)
			cc = append(cc, r.cpuContainerd)
			csh = append(csh, r.cpuShims)
			cd = append(cd, r.cpuDriver)
		}
		g.readyP50, g.readyP95, g.servingP50 = spreadOf(p50), spreadOf(p95), spreadOf(s50)
		g.regRequests, g.regBlobGets, g.regBytes = spreadOf(req), spreadOf(blobs), spreadOf(bytes)
		g.disk, g.diskRuntime, g.diskPods, g.diskStore = spreadOf(disk), spreadOf(dr), spreadOf(dp), spreadOf(ds)
		g.cpuKubelet, g.cpuContainerd, g.cpuShims, g.cpuDriver = spreadOf(ck), spreadOf(cc), spreadOf(csh), spreadOf(cd)
		var fl []string
		for k, v := range fails {
			fl = append(fl, fmt.Sprintf("%d x %s", v, k))
		}
		sort.Strings(fl)
		g.failures = strings.Join(fl, "; ")
	}
	return groups
}

// shortFailure drops what differs from pod to pod (names, ids) from a
// failure reason so that reasons group.
func shortFailure(s string) string {
	if len(s) > 160 {
		s = s[:160] + "..."
	}
	return s
}

// fmtSec prints a spread of seconds: "1.23 (1.10-1.40)".
func fmtSec(s spread) string {
	if s.n == 0 {
		return "-"
	}
	if s.n == 1 {
		return fmt.Sprintf("%.2f", s.med)
	}
	return fmt.Sprintf("%.2f (%.2f-%.2f)", s.med, s.min, s.max)
}

func fmtMiB(s spread) string {
	if s.n == 0 {
		return "-"
	}
	f := func(v float64) string { return strconv.FormatFloat(v/(1<<20), 'f', 1, 64) }
	if s.n == 1 || s.min == s.max {
		return f(s.med)
	}
	return fmt.Sprintf("%s (%s-%s)", f(s.med), f(s.min), f(s.max))
}

func fmtCount(s spread) string {
	if s.n == 0 {
		return "-"
	}
	if s.n == 1 || s.min == s.max {
		return fmt.Sprintf("%.0f", s.med)
	}
	return fmt.Sprintf("%.0f (%.0f-%.0f)", s.med, s.min, s.max)
}

func fmtCPU(s spread) string {
	if s.n == 0 {
		return "-"
	}
	if s.n == 1 {
		return fmt.Sprintf("%.2f", s.med)
	}
	return fmt.Sprintf("%.2f (%.2f-%.2f)", s.med, s.min, s.max)
}

// printTable prints the summary: one row per (size, N, mode, way), medians
// over repetitions with (min-max).
func printTable(w io.Writer, machine string, groups []group) {
	fmt.Fprintf(w, "\nwasm-csi cluster benchmark: medians over repetitions, (min-max) across them\n%s\n", machine)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "size\tN\tmode\tway\tstarted\tready p50 s\tready p95 s\tserving p50 s\tregistry req\tregistry MiB\tdisk +MiB\tCPU s kubelet\tcontainerd\tshims\tdriver\tload\t")
	for _, g := range groups {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d/%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.1f-%.1f\t\n",
			sizeLabel(g.size), g.n, g.mode, g.way.label, g.started, g.pods,
			fmtSec(g.readyP50), fmtSec(g.readyP95), fmtSec(g.servingP50),
			fmtCount(g.regRequests), fmtMiB(g.regBytes), fmtMiB(g.disk),
			fmtCPU(g.cpuKubelet), fmtCPU(g.cpuContainerd), fmtCPU(g.cpuShims), fmtCPU(g.cpuDriver), g.load[0], g.load[1])
	}
	tw.Flush()
	var notes []string
	for _, g := range groups {
		if g.failures != "" {
			notes = append(notes, fmt.Sprintf("  %s N=%d %s %s: %s", sizeLabel(g.size), g.n, g.mode, g.way.label, g.failures))
		}
	}
	if len(notes) > 0 {
		fmt.Fprintf(w, "\npods that did not start, and why:\n%s\n", strings.Join(notes, "\n"))
	}
}

// printMarkdown prints the summary as a Markdown table (for the README).
func printMarkdown(w io.Writer, groups []group) {
	fmt.Fprintln(w, "| size | N | mode | way | started | ready p50 s | ready p95 s | serving p50 s | registry req | registry MiB | disk +MiB | CPU s kubelet / containerd / shims / driver |")
	fmt.Fprintln(w, "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
	for _, g := range groups {
		fmt.Fprintf(w, "| %s | %d | %s | %s | %d/%d | %s | %s | %s | %s | %s | %s | %s / %s / %s / %s |\n",
			sizeLabel(g.size), g.n, g.mode, g.way.label, g.started, g.pods,
			fmtSec(g.readyP50), fmtSec(g.readyP95), fmtSec(g.servingP50),
			fmtCount(g.regRequests), fmtMiB(g.regBytes), fmtMiB(g.disk),
			fmtCPU(g.cpuKubelet), fmtCPU(g.cpuContainerd), fmtCPU(g.cpuShims), fmtCPU(g.cpuDriver))
	}
}

// writeOutputs writes runs.csv, pods.csv, summary.csv, summary.md and
// machine.txt into dir.
func writeOutputs(dir, machine string, results []runResult) error {
	if err := os.WriteFile(filepath.Join(dir, "machine.txt"), []byte(machine+"\n"), 0o644); err != nil {
		return err
	}
	runs := [][]string{{"size_bytes", "n", "way", "mode", "rep", "start_utc", "started", "ready_p50_s", "ready_p95_s", "serving_p50_s", "serving_p95_s", "wall_s",
		"registry_requests", "registry_blob_gets", "registry_bytes", "disk_runtime_bytes", "disk_pods_bytes", "disk_store_bytes",
		"cpu_kubelet_s", "cpu_containerd_s", "cpu_shims_s", "cpu_driver_s", "load1_start", "load1_end", "run_error", "failures"}}
	pods := [][]string{{"size_bytes", "n", "way", "mode", "rep", "pod", "ready_s", "serving_s", "failure"}}
	f3 := func(v float64) string { return strconv.FormatFloat(v, 'f', 3, 64) }
	for _, r := range results {
		rt, st := readyTimes(r), servingTimes(r)
		row := []string{strconv.FormatInt(r.size, 10), strconv.Itoa(r.n), r.way.key, r.mode, strconv.Itoa(r.rep), r.start.UTC().Format(time.RFC3339),
			strconv.Itoa(r.ok()), "", "", "", "", f3(r.wall.Seconds()),
			strconv.Itoa(r.regRequests), strconv.Itoa(r.regBlobGets), strconv.FormatInt(r.regBytes, 10),
			strconv.FormatInt(r.diskRuntime, 10), strconv.FormatInt(r.diskPods, 10), strconv.FormatInt(r.diskStore, 10),
			f3(r.cpuKubelet), f3(r.cpuContainerd), f3(r.cpuShims), f3(r.cpuDriver), f3(r.load[0]), f3(r.load[1]), r.err, failures(r)}
		if len(rt) > 0 {
			row[7], row[8], row[9], row[10] = f3(pct(rt, 50).Seconds()), f3(pct(rt, 95).Seconds()), f3(pct(st, 50).Seconds()), f3(pct(st, 95).Seconds())
		}
		runs = append(runs, row)
		for _, p := range r.pods {
			pr := []string{strconv.FormatInt(r.size, 10), strconv.Itoa(r.n), r.way.key, r.mode, strconv.Itoa(r.rep), p.name, "", "", p.failure}
			if p.failure == "" {
				pr[6], pr[7] = f3(p.ready.Seconds()), f3(p.serving.Seconds())
			}
			pods = append(pods, pr)
		}
	}
	sum := [][]string{{"size_bytes", "n", "mode", "way", "started", "pods", "ready_p50_s_median", "ready_p50_s_min", "ready_p50_s_max",
		"ready_p95_s_median", "ready_p95_s_min", "ready_p95_s_max", "serving_p50_s_median", "registry_requests_median", "registry_bytes_median",
		"disk_bytes_median", "disk_bytes_min", "disk_bytes_max", "cpu_kubelet_s_median", "cpu_containerd_s_median", "cpu_shims_s_median", "cpu_driver_s_median", "failures"}}
	for _, g := range summarize(results) {
		sum = append(sum, []string{strconv.FormatInt(g.size, 10), strconv.Itoa(g.n), g.mode, g.way.key, strconv.Itoa(g.started), strconv.Itoa(g.pods),
			f3(g.readyP50.med), f3(g.readyP50.min), f3(g.readyP50.max), f3(g.readyP95.med), f3(g.readyP95.min), f3(g.readyP95.max),
			f3(g.servingP50.med), f3(g.regRequests.med), f3(g.regBytes.med), f3(g.disk.med), f3(g.disk.min), f3(g.disk.max),
			f3(g.cpuKubelet.med), f3(g.cpuContainerd.med), f3(g.cpuShims.med), f3(g.cpuDriver.med), g.failures})
	}
	for name, rows := range map[string][][]string{"runs.csv": runs, "pods.csv": pods, "summary.csv": sum} {
		if err := writeCSV(filepath.Join(dir, name), rows); err != nil {
			return err
		}
	}
	f, err := os.Create(filepath.Join(dir, "summary.md"))
	if err != nil {
		return err
	}
	printMarkdown(f, summarize(results))
	return f.Close()
}

func writeCSV(path string, rows [][]string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := csv.NewWriter(f)
	if err := w.WriteAll(rows); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// describeMachine says what the figures were measured on.
func describeMachine(ctx context.Context, cs kubernetes.Interface, cfg config) (string, error) {
	n, err := cs.CoreV1().Nodes().Get(ctx, cfg.node, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("node %s: %w", cfg.node, err)
	}
	model := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	mem := "?"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
		if len(f) >= 2 {
			if kb, err := strconv.ParseFloat(f[1], 64); err == nil {
				mem = fmt.Sprintf("%.0f GiB", kb/(1<<20))
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	l := loadAvg()
	ni := n.Status.NodeInfo
	return fmt.Sprintf("machine: %d CPUs (%s), %s RAM, kernel %s, %s\nnode: kubelet %s, %s\nload average at start: %.2f %.2f %.2f\nflags: N=%v sizes=%v reps=%d modes=%v ways=%v",
		runtime.NumCPU(), model, mem, strings.TrimSpace(string(kernel)), ni.OSImage,
		ni.KubeletVersion, ni.ContainerRuntimeVersion, l[0], l[1], l[2],
		cfg.counts, sizesLabel(cfg.sizes), cfg.reps, cfg.modes, wayKeysOf(cfg.ways)), nil
}

func sizesLabel(s []int64) []string {
	var out []string
	for _, v := range s {
		out = append(out, sizeLabel(v))
	}
	return out
}

func wayKeysOf(ws []way) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.key)
	}
	return out
}

// printTargets checks the targets against the summary, per module
// size and wasm-csi format: warm Ready p50 within 100 ms of the baseline at
// the largest N; no slower than the init container at any N (p50, cold and
// warm); registry bytes at most one module per node; the node's disk growth
// one copy of the module whatever N is (the init container's grows by N).
func printTargets(w io.Writer, groups []group) {
	find := func(size int64, n int, key, mode string) *group {
		for i := range groups {
			g := &groups[i]
			if g.size == size && g.n == n && g.way.key == key && g.mode == mode {
				return g
			}
		}
		return nil
	}
	var sizes []int64
	var counts []int
	seen := map[string]bool{}
	for _, g := range groups {
		if k := fmt.Sprint("s", g.size); !seen[k] {
			seen[k] = true
			sizes = append(sizes, g.size)
		}
		if k := fmt.Sprint("n", g.n); !seen[k] {
			seen[k] = true
			counts = append(counts, g.n)
		}
	}
	sort.Ints(counts)
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT met"
	}
	fmt.Fprintln(w, "\ntargets (medians over repetitions):")
	for _, size := range sizes {
		for _, key := range []string{"csi-docker", "csi-cncf"} {
			name := fmt.Sprintf("  %s %s:", sizeLabel(size), key)
			if len(counts) > 0 {
				maxN := counts[len(counts)-1]
				c, b := find(size, maxN, key, modeWarm), find(size, maxN, "baseline", modeWarm)
				if c != nil && b != nil && c.readyP50.n > 0 && b.readyP50.n > 0 {
					d := c.readyP50.med - b.readyP50.med
					fmt.Fprintf(w, "%s warm N=%d ready p50 %+.0f ms vs the baseline (target <= +100 ms): %s\n", name, maxN, d*1000, verdict(d <= 0.1))
				}
			}
			for _, mode := range []string{modeCold, modeWarm} {
				for _, n := range counts {
					c, i := find(size, n, key, mode), find(size, n, "init", mode)
					if c == nil || i == nil || c.readyP50.n == 0 || i.readyP50.n == 0 {
						continue
					}
					d := c.readyP50.med - i.readyP50.med
					fmt.Fprintf(w, "%s %s N=%d ready p50 %+.0f ms vs the init container (target <= 0): %s\n", name, mode, n, d*1000, verdict(d <= 0))
				}
				for _, n := range counts {
					c := find(size, n, key, mode)
					if c == nil || c.regBytes.n == 0 || mode != modeCold {
						continue
					}
					fmt.Fprintf(w, "%s cold N=%d registry %s = %.2f modules (target <= 1 per node, plus manifests): %s\n",
						name, n, fmtMiB(c.regBytes)+" MiB", c.regBytes.med/float64(size), verdict(c.regBytes.med < 1.05*float64(size)))
					fmt.Fprintf(w, "%s cold N=%d disk +%s MiB = %.2f module copies (target: one copy whatever N)\n",
						name, n, fmtMiB(c.disk), c.disk.med/float64(size))
				}
			}
		}
		for _, n := range counts {
			if i := find(size, n, "init", modeCold); i != nil && i.disk.n > 0 {
				fmt.Fprintf(w, "  %s init cold N=%d disk +%s MiB = %.2f module copies (grows with N)\n", sizeLabel(size), n, fmtMiB(i.disk), i.disk.med/float64(size))
			}
		}
	}
}
