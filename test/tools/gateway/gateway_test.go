package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

const samplePlugin = "../../testdata/plugin.wasm"

func writeModule(t *testing.T, code []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "plugin.wasm")
	if err := os.WriteFile(p, code, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadSamplePlugin(t *testing.T) {
	code, err := os.ReadFile(samplePlugin)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := load(samplePlugin)
	if err != nil {
		t.Fatalf("load(%s): %v", samplePlugin, err)
	}
	sum := sha256.Sum256(code)
	if rep.SHA256 != hex.EncodeToString(sum[:]) || rep.Bytes != int64(len(code)) {
		t.Errorf("sha256=%s bytes=%d, want %x and %d", rep.SHA256, rep.Bytes, sum, len(code))
	}
	if rep.Path != samplePlugin {
		t.Errorf("path %q, want %q", rep.Path, samplePlugin)
	}
	if rep.VMStartResult != 1 {
		t.Errorf("vmStartResult %d, want 1", rep.VMStartResult)
	}
	if rep.ABIVersion != wasmgen.ABIVersionExport {
		t.Errorf("abiVersion %q, want %q", rep.ABIVersion, wasmgen.ABIVersionExport)
	}
	if !slices.Equal(rep.Log, []string{wasmgen.DefaultMessage}) {
		t.Errorf("log %q, want [%q]", rep.Log, wasmgen.DefaultMessage)
	}
	if len(rep.Stubbed) != 0 {
		t.Errorf("stubbed %v: the sample imports only proxy_log, which the gateway implements", rep.Stubbed)
	}
	// A file in the test's temporary directory is writable.
	if rep.ReadOnly {
		t.Errorf("readonly=true for %s (%s)", samplePlugin, rep.ReadOnlyDetail)
	}
}

func TestLoadLogsTheModulesMessage(t *testing.T) {
	const msg = "a message of another module"
	p := writeModule(t, wasmgen.ProxyWasm(wasmgen.Options{Message: msg}))
	var levels []uint32
	rep, err := loadWith(p, hooks{log: func(level uint32, m string) {
		levels = append(levels, level)
		if m != msg {
			t.Errorf("log hook got %q, want %q", m, msg)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Log, []string{msg}) || !slices.Equal(levels, []uint32{2}) {
		t.Errorf("log %q at levels %v, want [%q] at [2] (info)", rep.Log, levels, msg)
	}
}

func TestLoadRefusesBadModules(t *testing.T) {
	for _, tc := range []struct {
		name string
		code []byte
		want string // in the error
	}{
		{"no ABI export", wasmgen.ProxyWasm(wasmgen.Options{OmitABIExport: true}), "proxy_abi_version_"},
		{"no memory export", wasmgen.ProxyWasm(wasmgen.Options{OmitMemoryExport: true}), "exports no memory"},
		{"no allocator", wasmgen.ProxyWasm(wasmgen.Options{OmitAllocatorExports: true}), "neither malloc nor proxy_on_memory_allocate"},
		{"garbage", wasmgen.Garbage(1000), "compile module"},
		{"truncated", wasmgen.Truncated(), "compile module"},
		{"empty", nil, "compile module"},
		{"import from another module", wasmgen.ProxyWasm(wasmgen.Options{
			Imports: []wasmgen.Import{{Module: "not_env", Name: "f", Params: 1, Results: 1}},
		}), "imports not_env.f"},
		{"memory over Envoy's limit", wasmgen.ProxyWasm(wasmgen.Options{MinMemoryPages: 65536}), "compile module"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeModule(t, tc.code)
			rep, err := load(p)
			if err == nil {
				t.Fatalf("load succeeded: %+v", rep)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			// The file was read: its digest is reported even on failure.
			sum := sha256.Sum256(tc.code)
			if rep.SHA256 != hex.EncodeToString(sum[:]) {
				t.Errorf("sha256 %q, want %x", rep.SHA256, sum)
			}
			if slices.Contains(rep.Log, wasmgen.DefaultMessage) {
				t.Errorf("the module ran: log %q", rep.Log)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := load(filepath.Join(t.TempDir(), "absent.wasm"))
	if err == nil || !strings.Contains(err.Error(), "read module") {
		t.Fatalf("err %v, want a read error", err)
	}
}

// Modules built with real SDKs import many env functions and WASI; each
// links (to a stub returning Status OK where not implemented) and the VM
// starts.
func TestLoadLinksExtraImports(t *testing.T) {
	code := wasmgen.ProxyWasm(wasmgen.Options{
		ExtraEnvImport: "not_a_proxy_wasm_function",
		Imports: []wasmgen.Import{
			{Module: "env", Name: "proxy_get_property", Params: 4, Results: 1},
			{Module: "env", Name: "proxy_set_tick_period_milliseconds", Params: 1, Results: 1},
			{Module: "env", Name: "proxy_get_log_level", Params: 1, Results: 1},
			{Module: "env", Name: "proxy_http_call", Params: 10, Results: 1},
			{Module: "env", Name: "proxy_done", Params: 0, Results: 1},
			{Module: "wasi_snapshot_preview1", Name: "fd_write", Params: 4, Results: 1},
			{Module: "wasi_snapshot_preview1", Name: "proc_exit", Params: 1, Results: 0},
			{Module: "wasi_unstable", Name: "random_get", Params: 2, Results: 1},
		},
	})
	rep, err := load(writeModule(t, code))
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	if !slices.Equal(rep.Log, []string{wasmgen.DefaultMessage}) {
		t.Errorf("log %q", rep.Log)
	}
	want := []string{"not_a_proxy_wasm_function", "proxy_done", "proxy_get_property", "proxy_http_call", "proxy_set_tick_period_milliseconds"}
	if !slices.Equal(rep.Stubbed, want) {
		t.Errorf("stubbed %v, want %v (proxy_log and proxy_get_log_level are implemented)", rep.Stubbed, want)
	}
}

// An implemented host function imported with another type is stubbed with
// that type rather than refused.
func TestLoadStubsImplementedFunctionOfOtherType(t *testing.T) {
	code := wasmgen.ProxyWasm(wasmgen.Options{
		Imports: []wasmgen.Import{{Module: "env", Name: "proxy_get_log_level", Params: 2, Results: 1}},
	})
	rep, err := load(writeModule(t, code))
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	if !slices.Equal(rep.Stubbed, []string{"proxy_get_log_level"}) {
		t.Errorf("stubbed %v", rep.Stubbed)
	}
}

var loadedRE = regexp.MustCompile(`^wasm-gateway: loaded (\S+) sha256=([0-9a-f]{64}) bytes=(\d+) readonly=(true|false)$`)

func TestRunCheck(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(samplePlugin, "", true, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, &stdout, &stderr)
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	m := loadedRE.FindStringSubmatch(lines[0])
	if m == nil {
		t.Fatalf("first line %q does not match %s", lines[0], loadedRE)
	}
	code, _ := os.ReadFile(samplePlugin)
	sum := sha256.Sum256(code)
	if m[1] != samplePlugin || m[2] != hex.EncodeToString(sum[:]) || m[3] != "529" || m[4] != "false" {
		t.Errorf("loaded line %q", lines[0])
	}
	if want := "wasm-gateway: module log info: " + wasmgen.DefaultMessage; lines[1] != want {
		t.Errorf("second line %q, want %q", lines[1], want)
	}
	if want := "wasm-gateway: started abi=proxy_abi_version_0_2_1 vm_start=1"; lines[len(lines)-1] != want {
		t.Errorf("last line %q, want %q", lines[len(lines)-1], want)
	}
	// Between them: the JSON report.
	var rep report
	if err := json.Unmarshal([]byte(strings.Join(lines[2:len(lines)-1], "\n")), &rep); err != nil {
		t.Fatalf("report: %v\n%s", err, &stdout)
	}
	if rep.SHA256 != m[2] || rep.VMStartResult != 1 {
		t.Errorf("report %+v", rep)
	}
	if stderr.Len() != 0 {
		t.Errorf("stderr: %s", &stderr)
	}
}

func TestRunFailsOnBadModule(t *testing.T) {
	p := writeModule(t, wasmgen.ProxyWasm(wasmgen.Options{OmitABIExport: true}))
	for _, check := range []bool{true, false} {
		var stdout, stderr bytes.Buffer
		if code := run(p, "127.0.0.1:0", check, &stdout, &stderr); code != 1 {
			t.Errorf("check=%t: exit %d, want 1", check, code)
		}
		if first, _, _ := strings.Cut(stdout.String(), "\n"); !loadedRE.MatchString(first) {
			t.Errorf("check=%t: first line %q: the digest is reported before the failure", check, first)
		}
		if !strings.HasPrefix(stderr.String(), "wasm-gateway: error: module "+p+": exports no proxy_abi_version_") {
			t.Errorf("check=%t: stderr %q", check, &stderr)
		}
	}
}

func TestHandler(t *testing.T) {
	rep, err := load(samplePlugin)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(handler(rep))
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	code, body := get("/module")
	if code != 200 {
		t.Fatalf("/module: %d %q", code, body)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"path", "sha256", "bytes", "readonly", "vmStartResult", "log"} {
		if _, ok := got[k]; !ok {
			t.Errorf("/module has no %q: %s", k, body)
		}
	}
	if got["sha256"] != rep.SHA256 || got["vmStartResult"] != 1.0 || got["readonly"] != false {
		t.Errorf("/module: %s", body)
	}
	if log, _ := got["log"].([]any); len(log) != 1 || log[0] != wasmgen.DefaultMessage {
		t.Errorf("/module log: %v", got["log"])
	}
	if code, _ := get("/nothing"); code != 404 {
		t.Errorf("/nothing: %d", code)
	}
}

// A writable file is reported as such; the e2e suite checks that a real
// wasm-csi mount is reported read-only (this test does not mount anything).
func TestReadOnlyDetection(t *testing.T) {
	p := writeModule(t, []byte("x"))
	ro, detail := readOnly(p)
	if ro || detail != "statfs: read-write; open for write: succeeded" {
		t.Errorf("%s: readonly=%t (%s)", p, ro, detail)
	}
	before, _ := os.ReadFile(p)
	if string(before) != "x" {
		t.Errorf("readOnly changed the file: %q", before)
	}
	if ro, detail := readOnly(filepath.Join(t.TempDir(), "absent")); ro || !strings.Contains(detail, "no such file") {
		t.Errorf("absent file: readonly=%t (%s)", ro, detail)
	}
}

// The real binary, built static: it serves until SIGTERM, then exits 0.
func TestBinaryServesUntilSIGTERM(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "gateway")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "-module", samplePlugin, "-listen", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(stdout)
	var lines []string
	addr := ""
	for addr == "" && sc.Scan() {
		lines = append(lines, sc.Text())
		if _, a, ok := strings.Cut(sc.Text(), " listening on "); ok {
			addr = a
		}
	}
	if addr == "" {
		cmd.Wait()
		t.Fatalf("no listening line; stdout %q, stderr %s", lines, &stderr)
	}
	if !loadedRE.MatchString(lines[0]) {
		t.Errorf("first line %q", lines[0])
	}
	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "ok" {
		t.Errorf("/healthz: %d %q", resp.StatusCode, body)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(stdout)
	if err := cmd.Wait(); err != nil {
		t.Errorf("after SIGTERM: %v (stderr %s)", err, &stderr)
	}
	if !strings.Contains(string(rest), "wasm-gateway: stopped") {
		t.Errorf("after SIGTERM, stdout %q", rest)
	}
}

// With -module "" (the cluster benchmark's baseline) it reads nothing and
// starts.
func TestRunWithoutModule(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run("", "", true, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, &stdout, &stderr)
	}
	if got, want := stdout.String(), "wasm-gateway: started without a module\n"; got != want {
		t.Errorf("stdout %q, want %q", got, want)
	}
	stdout.Reset()
	if code := run("", "256.0.0.1:0", false, &stdout, &stderr); code != 1 {
		t.Errorf("listening on a bad address: exit %d, want 1 (stdout %q)", code, &stdout)
	}
	if !strings.Contains(stderr.String(), "wasm-gateway: error: ") {
		t.Errorf("stderr %q", &stderr)
	}
}
