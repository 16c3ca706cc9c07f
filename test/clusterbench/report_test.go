package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

func TestPct(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var out []time.Duration
		for _, x := range v {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	for _, tc := range []struct {
		in   []time.Duration
		p    float64
		want time.Duration
	}{
		{nil, 50, 0},
		{ms(7), 50, 7 * time.Millisecond},
		{ms(7), 95, 7 * time.Millisecond},
		{ms(4, 1, 3, 2), 50, 2 * time.Millisecond},
		{ms(4, 1, 3, 2), 95, 4 * time.Millisecond},
		{ms(10, 9, 8, 7, 6, 5, 4, 3, 2, 1), 95, 10 * time.Millisecond},
		{ms(10, 9, 8, 7, 6, 5, 4, 3, 2, 1), 90, 9 * time.Millisecond},
	} {
		if got := pct(tc.in, tc.p); got != tc.want {
			t.Errorf("pct(%v, %v) = %v, want %v", tc.in, tc.p, got, tc.want)
		}
	}
}

func TestSpreadOf(t *testing.T) {
	if s := spreadOf([]float64{3, 1, 2}); s.med != 2 || s.min != 1 || s.max != 3 || s.n != 3 {
		t.Errorf("odd: %+v", s)
	}
	if s := spreadOf([]float64{4, 1, 2, 3}); s.med != 2.5 || s.min != 1 || s.max != 4 {
		t.Errorf("even: %+v", s)
	}
	if s := spreadOf(nil); s.n != 0 || fmtSec(s) != "-" {
		t.Errorf("empty: %+v %q", s, fmtSec(s))
	}
}

func TestParseGatewayLog(t *testing.T) {
	log := `2026-12-01T15:00:00.100000000Z wasm-gateway: loaded /etc/wasm/plugin.wasm sha256=` + strings.Repeat("ab", 32) + ` bytes=1048576 readonly=true
2026-12-01T15:00:00.200000000Z wasm-gateway: module log info: hello
2026-12-01T15:00:00.350000000Z wasm-gateway: started abi=proxy_abi_version_0_2_1 vm_start=1 listening on [::]:8080
`
	g := parseGatewayLog(strings.NewReader(log))
	if g.sha256 != strings.Repeat("ab", 32) || g.bytes != 1048576 || g.errLine != "" {
		t.Errorf("%+v", g)
	}
	if want := time.Date(2026, 12, 1, 15, 0, 0, 350000000, time.UTC); !g.started.Equal(want) {
		t.Errorf("started %v, want %v", g.started, want)
	}

	crash := "2026-12-01T15:00:00.1Z wasm-gateway: error: read module: open /etc/wasm/plugin.wasm: no such file or directory\n"
	g = parseGatewayLog(strings.NewReader(crash))
	if !g.started.IsZero() || g.errLine != "read module: open /etc/wasm/plugin.wasm: no such file or directory" {
		t.Errorf("%+v", g)
	}

	base := "2026-12-01T15:00:00.5Z wasm-gateway: started without a module listening on [::]:8080\n"
	if g = parseGatewayLog(strings.NewReader(base)); g.started.IsZero() || g.sha256 != "" {
		t.Errorf("%+v", g)
	}
}

func TestPodFailure(t *testing.T) {
	p := &corev1.Pod{Status: corev1.PodStatus{Phase: corev1.PodPending}}
	if f := podFailure(p); f != "" {
		t.Errorf("pending pod: %q", f)
	}
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{
		Name:                 "gateway",
		RestartCount:         1,
		LastTerminationState: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 1, Reason: "Error"}},
	}}
	if f := podFailure(p); f != "gateway: crash-loop: exited 1 (Error)" {
		t.Errorf("restarted: %q", f)
	}
	p.Status.ContainerStatuses = []corev1.ContainerStatus{{
		Name:  "gateway",
		State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}},
	}}
	if f := podFailure(p); f != "" {
		t.Errorf("creating: %q", f)
	}
	p.Status.InitContainerStatuses = []corev1.ContainerStatus{{
		Name:  "copy-module",
		State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ErrImagePull", Message: "not found"}},
	}}
	if f := podFailure(p); f != "copy-module: ErrImagePull: not found" {
		t.Errorf("image pull: %q", f)
	}
}

func TestParseFlags(t *testing.T) {
	c, err := parseFlags([]string{"-n", "1,30", "-sizes", "1Mi,512Ki", "-ways", "baseline,csi-cncf", "-modes", "warm", "-reps", "2"})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.counts) != 2 || c.counts[1] != 30 || c.sizes[0] != 1<<20 || c.sizes[1] != 512<<10 ||
		len(c.ways) != 2 || c.ways[1].key != "csi-cncf" || c.modes[0] != modeWarm || c.reps != 2 {
		t.Errorf("%+v", c)
	}
	for _, bad := range [][]string{{"-n", "0"}, {"-sizes", "1Gx"}, {"-ways", "docker"}, {"-modes", "hot"}, {"-reps", "0"}} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

// Every way's pod runs the same gateway; the module reaches /etc/wasm as
// each way has it.
func TestPods(t *testing.T) {
	img := images{docker: "r/m-docker:1", cncf: "r/m-cncf:1", init: "r/m-init:1"}
	for _, w := range allWays {
		p := w.pod("ns", "p", img, nil)
		gw := p.Spec.Containers[0]
		if gw.Image != gatewayImage {
			t.Errorf("%s: image %s", w.key, gw.Image)
		}
		switch w.kind {
		case kindBaseline:
			if len(p.Spec.Volumes) != 0 || len(gw.Args) != 1 || gw.Args[0] != "-module=" {
				t.Errorf("baseline: %+v %v", p.Spec.Volumes, gw.Args)
			}
		case kindInit:
			if p.Spec.Volumes[0].EmptyDir == nil || p.Spec.InitContainers[0].Image != img.init {
				t.Errorf("init: %+v", p.Spec)
			}
		case kindImageVolume:
			want := img.docker
			if w.cncf {
				want = img.cncf
			}
			if iv := p.Spec.Volumes[0].Image; iv == nil || iv.Reference != want {
				t.Errorf("%s: %+v", w.key, p.Spec.Volumes)
			}
		case kindCSI:
			want := img.docker
			if w.cncf {
				want = img.cncf
			}
			if c := p.Spec.Volumes[0].CSI; c == nil || c.Driver != driverName || c.VolumeAttributes["image"] != want {
				t.Errorf("%s: %+v", w.key, p.Spec.Volumes)
			}
		}
		if w.kind != kindBaseline && (len(gw.VolumeMounts) != 1 || gw.VolumeMounts[0].MountPath != moduleDir) {
			t.Errorf("%s: mounts %+v", w.key, gw.VolumeMounts)
		}
	}
}

// The outputs are written from results, failures included.
func TestOutputs(t *testing.T) {
	ok := runResult{size: 1 << 20, way: allWays[4], n: 2, mode: modeCold, rep: 1, start: time.Now(),
		pods:     []podResult{{name: "a", ready: time.Second, serving: 2 * time.Second}, {name: "b", ready: 3 * time.Second, serving: 3 * time.Second}},
		regBytes: 1 << 20, diskStore: 1 << 20}
	bad := runResult{size: 1 << 20, way: allWays[3], n: 1, mode: modeCold, rep: 1, start: time.Now(),
		pods: []podResult{{name: "c", failure: "gateway: crash-loop: exited 1 (Error): read module: no such file"}}}
	dir := t.TempDir()
	if err := writeOutputs(dir, "machine: test", []runResult{ok, bad}); err != nil {
		t.Fatal(err)
	}
	runs, err := os.ReadFile(filepath.Join(dir, "runs.csv"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(runs), "csi-docker,cold,1,") || !strings.Contains(string(runs), "read module: no such file") {
		t.Errorf("runs.csv:\n%s", runs)
	}
	var out bytes.Buffer
	sum := summarize([]runResult{ok, bad})
	printTable(&out, "machine: test", sum)
	for _, want := range []string{"(d) wasm-csi, Docker image", "2/2", "0/1", "crash-loop"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, &out)
		}
	}
	out.Reset()
	printTargets(&out, sum)
	if !strings.Contains(out.String(), "csi-docker: cold N=2 registry 1.0 MiB = 1.00 modules") {
		t.Errorf("targets:\n%s", &out)
	}
	if sum[0].readyP50.med != 1 || sum[0].readyP95.med != 3 {
		t.Errorf("p50 %v p95 %v", sum[0].readyP50, sum[0].readyP95)
	}
	if err := writeChart(filepath.Join(dir, "c.png"), sum, "machine: test\nnode: test"); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "c.png")); err != nil || !bytes.HasPrefix(b, []byte("\x89PNG")) {
		t.Errorf("chart: %v", err)
	}
}
