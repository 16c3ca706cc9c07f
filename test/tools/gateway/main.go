// Command gateway is the test gateway of the end-to-end suite: a stand-in for
// Envoy with a bootstrap Wasm extension (envoy.bootstrap.wasm). Like Envoy, it
// loads a proxy-wasm module from a local file at start, refuses to start (exits
// non-zero) if the module cannot be loaded, and then keeps running.
//
// At start it:
//
//  1. reads the module file (-module, default /etc/wasm/plugin.wasm) and
//     prints one line
//     "wasm-gateway: loaded PATH sha256=<hex> bytes=<n> readonly=true|false",
//     readonly telling whether the file is on a read-only mount (statfs
//     ST_RDONLY, or opening it for writing fails with EROFS);
//  2. compiles it with wazero and checks the proxy-wasm ABI exports Envoy
//     needs: a proxy_abi_version_* function, the memory, proxy_on_vm_start,
//     and malloc or proxy_on_memory_allocate;
//  3. instantiates it with a host module "env" that implements proxy_log
//     (the guest's messages are printed and kept), proxy_get_log_level and
//     proxy_get_current_time_nanoseconds, and links every other env function
//     the module imports to a stub of the imported type that returns 0
//     (Status OK), so modules built with real proxy-wasm SDKs link too; WASI
//     imports (wasi_snapshot_preview1, wasi_unstable) get wazero's WASI;
//     imports from any other module refuse the module, as Envoy does;
//  4. calls _initialize (else _start) if exported, as Envoy does for WASI
//     modules, then proxy_on_context_create(1, 0) if exported and
//     proxy_on_vm_start(1, 0), which must return non-zero.
//
// Each guest log line is printed as "wasm-gateway: module log <level>: <msg>".
// On success it prints
// "wasm-gateway: started abi=<version> vm_start=<n> listening on <addr>" and
// serves HTTP on -listen (default :8080): GET /healthz answers 200 "ok", GET
// /module the JSON report (path, sha256, bytes, readonly, vmStartResult, log,
// ...). It runs until SIGTERM or SIGINT, then exits 0. On any failure it
// prints "wasm-gateway: error: <reason>" to stderr and exits 1.
//
// With -check it loads the module, prints the same lines (the JSON report
// after the log lines; the started line without "listening on") and exits (0
// if the module started, 1 if not) without serving: for
// `kubectl exec POD -- /gateway -check` in an image that has no shell or curl.
//
// With -module "" it loads nothing, prints
// "wasm-gateway: started without a module listening on <addr>" and serves
// (/module answers the empty report): the baseline pod of the cluster
// benchmark (test/clusterbench), the same container with no module to get.
//
// The module never receives traffic: this proves the file a pod sees is a
// module Envoy would start, not that a filter works.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"golang.org/x/sys/unix"
)

// DefaultModule is where the examples mount the module.
const DefaultModule = "/etc/wasm/plugin.wasm"

// Limits like Envoy's: 1 GiB of linear memory
// (PROXY_WASM_HOST_MAX_WASM_MEMORY_SIZE_BYTES); guest calls at start are
// bounded so a module that loops fails instead of hanging the pod.
const (
	maxMemoryPages = 16384
	callTimeout    = 30 * time.Second
	rootContextID  = 1
	abiPrefix      = "proxy_abi_version_"
)

// proxy-wasm WasmResult values.
const (
	statusOK                  = 0
	statusInvalidMemoryAccess = 6
)

// report is what the gateway found out about its module; /module serves it
// as JSON.
type report struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
	Bytes  int64  `json:"bytes"`
	// ReadOnly: the file is on a read-only mount; ReadOnlyDetail says why
	// the gateway thinks so (statfs flags, the error opening it for write).
	ReadOnly       bool   `json:"readonly"`
	ReadOnlyDetail string `json:"readonlyDetail"`
	ABIVersion     string `json:"abiVersion,omitempty"`
	// VMStartResult is what proxy_on_vm_start(1, 0) returned.
	VMStartResult uint32 `json:"vmStartResult"`
	// Log holds the messages the module logged with proxy_log, in order.
	Log []string `json:"log"`
	// Stubbed lists the env imports linked to stubs returning 0.
	Stubbed []string `json:"stubbedImports,omitempty"`
}

// logFunc receives a guest log message as it is logged.
type logFunc func(level uint32, msg string)

// hooks let the caller of loadWith see progress: read (if not nil) gets the
// report once the file is read and checked for a read-only mount, before the
// module is compiled; log (if not nil) gets each guest log message as it is
// logged.
type hooks struct {
	read func(report)
	log  logFunc
}

// load loads the module at path as the gateway does at start, collecting
// guest logs into the report. The report is filled as far as loading got,
// also when err is not nil.
func load(path string) (report, error) {
	return loadWith(path, hooks{})
}

// loadWith is load with hooks.
func loadWith(path string, h hooks) (report, error) {
	rep := report{Path: path, Log: []string{}}
	code, err := os.ReadFile(path)
	if err != nil {
		return rep, fmt.Errorf("read module: %w", err)
	}
	sum := sha256.Sum256(code)
	rep.SHA256 = hex.EncodeToString(sum[:])
	rep.Bytes = int64(len(code))
	rep.ReadOnly, rep.ReadOnlyDetail = readOnly(path)
	if h.read != nil {
		h.read(rep)
	}

	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	rt := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfig().
		WithCoreFeatures(api.CoreFeaturesV2).
		WithMemoryLimitPages(maxMemoryPages).
		WithCloseOnContextDone(true))
	defer rt.Close(context.Background())

	cm, err := rt.CompileModule(ctx, code)
	if err != nil {
		return rep, fmt.Errorf("compile module %s: %w", path, err)
	}
	abi, err := checkABI(cm)
	rep.ABIVersion = abi
	if err != nil {
		return rep, fmt.Errorf("module %s: %w", path, err)
	}

	var mu sync.Mutex
	logged := func(level uint32, msg string) {
		mu.Lock()
		rep.Log = append(rep.Log, msg)
		mu.Unlock()
		if h.log != nil {
			h.log(level, msg)
		}
	}
	stubbed, err := link(ctx, rt, cm, logged)
	rep.Stubbed = stubbed
	if err != nil {
		return rep, fmt.Errorf("link module %s: %w", path, err)
	}

	mod, err := rt.InstantiateModule(ctx, cm, wazero.NewModuleConfig().
		WithName("plugin").
		WithStartFunctions(). // called below, as Envoy does
		WithStdout(os.Stdout).
		WithStderr(os.Stderr).
		WithSysWalltime().
		WithSysNanotime().
		WithRandSource(cryptoRand{}))
	if err != nil {
		return rep, fmt.Errorf("instantiate module %s: %w", path, err)
	}
	for _, name := range []string{"_initialize", "_start"} {
		if f := mod.ExportedFunction(name); f != nil {
			if _, err := f.Call(ctx); err != nil {
				return rep, fmt.Errorf("module %s: %s: %w", path, name, err)
			}
			break
		}
	}
	if f := mod.ExportedFunction("proxy_on_context_create"); f != nil {
		if err := checkType(f.Definition(), 2, 0); err != nil {
			return rep, fmt.Errorf("module %s: proxy_on_context_create: %w", path, err)
		}
		if _, err := f.Call(ctx, rootContextID, 0); err != nil {
			return rep, fmt.Errorf("module %s: proxy_on_context_create(%d, 0): %w", path, rootContextID, err)
		}
	}
	res, err := mod.ExportedFunction("proxy_on_vm_start").Call(ctx, rootContextID, 0)
	if err != nil {
		return rep, fmt.Errorf("module %s: proxy_on_vm_start(%d, 0): %w", path, rootContextID, err)
	}
	rep.VMStartResult = api.DecodeU32(res[0])
	if rep.VMStartResult == 0 {
		return rep, fmt.Errorf("module %s: proxy_on_vm_start(%d, 0) returned 0 (failure): Envoy would not start", path, rootContextID)
	}
	return rep, nil
}

// checkABI checks the exports Envoy needs and returns the ABI version marker.
func checkABI(cm wazero.CompiledModule) (string, error) {
	funcs := cm.ExportedFunctions()
	var abis []string
	for name := range funcs {
		if strings.HasPrefix(name, abiPrefix) {
			abis = append(abis, name)
		}
	}
	slices.Sort(abis) // a module exports one; if several, report the newest
	abi := ""
	var problems []string
	if len(abis) == 0 {
		problems = append(problems, "exports no "+abiPrefix+"* function: it is not a proxy-wasm module")
	} else {
		abi = abis[len(abis)-1]
	}
	if len(cm.ExportedMemories()) == 0 {
		problems = append(problems, "exports no memory")
	}
	if def, ok := funcs["proxy_on_vm_start"]; !ok {
		problems = append(problems, "exports no proxy_on_vm_start")
	} else if err := checkType(def, 2, 1); err != nil {
		problems = append(problems, "proxy_on_vm_start: "+err.Error())
	}
	alloc, ok := funcs["malloc"]
	if !ok {
		alloc, ok = funcs["proxy_on_memory_allocate"]
	}
	if !ok {
		problems = append(problems, "exports neither malloc nor proxy_on_memory_allocate")
	} else if err := checkType(alloc, 1, 1); err != nil {
		problems = append(problems, alloc.ExportNames()[0]+": "+err.Error())
	}
	if len(problems) > 0 {
		return abi, errors.New(strings.Join(problems, "; "))
	}
	return abi, nil
}

// checkType checks that def takes params i32s and returns results i32s.
func checkType(def api.FunctionDefinition, params, results int) error {
	want := func(n int) []api.ValueType { return slices.Repeat([]api.ValueType{api.ValueTypeI32}, n) }
	if !slices.Equal(def.ParamTypes(), want(params)) || !slices.Equal(def.ResultTypes(), want(results)) {
		return fmt.Errorf("has type %s, want %s", sig(def.ParamTypes(), def.ResultTypes()), sig(want(params), want(results)))
	}
	return nil
}

func sig(params, results []api.ValueType) string {
	names := func(ts []api.ValueType) string {
		s := make([]string, len(ts))
		for i, t := range ts {
			s[i] = api.ValueTypeName(t)
		}
		return "(" + strings.Join(s, ",") + ")"
	}
	return names(params) + "->" + names(results)
}

var wasiModules = []string{wasi_snapshot_preview1.ModuleName, "wasi_unstable"}

// link instantiates the host modules the compiled module imports: "env"
// with proxy_log and the other host functions (stubs where not
// implemented), and WASI. It returns the env imports linked to stubs.
func link(ctx context.Context, rt wazero.Runtime, cm wazero.CompiledModule, logf logFunc) ([]string, error) {
	type fn struct{ params, results []api.ValueType }
	env := map[string]fn{}
	wasi := map[string]bool{}
	var problems []string
	for _, def := range cm.ImportedFunctions() {
		module, name, _ := def.Import()
		switch {
		case module == "env":
			f := fn{def.ParamTypes(), def.ResultTypes()}
			if prev, ok := env[name]; ok && (!slices.Equal(prev.params, f.params) || !slices.Equal(prev.results, f.results)) {
				problems = append(problems, fmt.Sprintf("imports env.%s twice, with types %s and %s", name, sig(prev.params, prev.results), sig(f.params, f.results)))
				continue
			}
			env[name] = f
		case slices.Contains(wasiModules, module):
			wasi[module] = true
		default:
			problems = append(problems, fmt.Sprintf("imports %s.%s, and Envoy links only env and WASI functions", module, name))
		}
	}
	for _, def := range cm.ImportedMemories() {
		module, name, _ := def.Import()
		problems = append(problems, fmt.Sprintf("imports memory %s.%s, which this test gateway cannot provide: export the memory instead", module, name))
	}
	if len(problems) > 0 {
		return nil, errors.New(strings.Join(problems, "; "))
	}

	for _, module := range wasiModules {
		if !wasi[module] {
			continue
		}
		b := rt.NewHostModuleBuilder(module)
		wasi_snapshot_preview1.NewFunctionExporter().ExportFunctions(b)
		if _, err := b.Instantiate(ctx); err != nil {
			return nil, fmt.Errorf("instantiate %s: %w", module, err)
		}
	}
	if len(env) == 0 {
		return nil, nil
	}

	var stubbed []string
	b := rt.NewHostModuleBuilder("env")
	for name, f := range env {
		impl := hostFunction(name, f.params, f.results, logf)
		if impl == nil {
			impl = stub(len(f.results))
			stubbed = append(stubbed, name)
		}
		b.NewFunctionBuilder().WithGoModuleFunction(impl, f.params, f.results).Export(name)
	}
	slices.Sort(stubbed)
	if _, err := b.Instantiate(ctx); err != nil {
		return stubbed, fmt.Errorf("instantiate env: %w", err)
	}
	return stubbed, nil
}

var (
	i32x1 = []api.ValueType{api.ValueTypeI32}
	i32x3 = []api.ValueType{api.ValueTypeI32, api.ValueTypeI32, api.ValueTypeI32}
)

// hostFunction returns the implementation of env.name if the gateway
// implements it with the type imported, else nil.
func hostFunction(name string, params, results []api.ValueType, logf logFunc) api.GoModuleFunction {
	is := func(p, r []api.ValueType) bool { return slices.Equal(params, p) && slices.Equal(results, r) }
	switch {
	case name == "proxy_log" && is(i32x3, i32x1):
		// proxy_log(level, message_data, message_size) -> status
		return api.GoModuleFunc(func(_ context.Context, m api.Module, stack []uint64) {
			level := api.DecodeU32(stack[0])
			msg, ok := m.Memory().Read(api.DecodeU32(stack[1]), api.DecodeU32(stack[2]))
			if !ok {
				stack[0] = statusInvalidMemoryAccess
				return
			}
			logf(level, string(msg))
			stack[0] = statusOK
		})
	case name == "proxy_get_log_level" && is(i32x1, i32x1):
		// proxy_get_log_level(return_level) -> status: trace, log everything.
		return api.GoModuleFunc(func(_ context.Context, m api.Module, stack []uint64) {
			if !m.Memory().WriteUint32Le(api.DecodeU32(stack[0]), 0) {
				stack[0] = statusInvalidMemoryAccess
				return
			}
			stack[0] = statusOK
		})
	case name == "proxy_get_current_time_nanoseconds" && is(i32x1, i32x1):
		// proxy_get_current_time_nanoseconds(return_time) -> status
		return api.GoModuleFunc(func(_ context.Context, m api.Module, stack []uint64) {
			if !m.Memory().WriteUint64Le(api.DecodeU32(stack[0]), uint64(time.Now().UnixNano())) {
				stack[0] = statusInvalidMemoryAccess
				return
			}
			stack[0] = statusOK
		})
	}
	return nil
}

// stub returns a host function that returns zeros: Status OK for the
// proxy-wasm host functions, all of which return a status.
func stub(results int) api.GoModuleFunction {
	return api.GoModuleFunc(func(_ context.Context, _ api.Module, stack []uint64) {
		clear(stack[:results])
	})
}

// readOnly tells whether path is on a read-only mount: statfs reports
// ST_RDONLY, or opening the file for writing fails with EROFS (opening
// without O_TRUNC changes nothing if it succeeds).
func readOnly(path string) (bool, string) {
	var details []string
	ro := false
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		details = append(details, "statfs: "+err.Error())
	} else if st.Flags&unix.ST_RDONLY != 0 {
		ro = true
		details = append(details, "statfs: ST_RDONLY")
	} else {
		details = append(details, "statfs: read-write")
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	switch {
	case err == nil:
		f.Close()
		details = append(details, "open for write: succeeded")
	case errors.Is(err, syscall.EROFS):
		ro = true
		details = append(details, "open for write: EROFS")
	default:
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		details = append(details, "open for write: "+err.Error())
	}
	return ro, strings.Join(details, "; ")
}

// cryptoRand is WASI's random source: like Envoy's random_get, real
// randomness (wazero's default is a fixed seed).
type cryptoRand struct{}

func (cryptoRand) Read(p []byte) (int, error) {
	read := 0
	for read < len(p) {
		n, err := unix.Getrandom(p[read:], 0)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return read, err
		}
		read += n
	}
	return read, nil
}

var _ io.Reader = cryptoRand{}

// levelName names a proxy-wasm log level.
func levelName(l uint32) string {
	names := []string{"trace", "debug", "info", "warn", "error", "critical"}
	if int(l) < len(names) {
		return names[l]
	}
	return fmt.Sprintf("level%d", l)
}

// loadedLine is the line the gateway prints after reading the module.
func loadedLine(r report) string {
	return fmt.Sprintf("wasm-gateway: loaded %s sha256=%s bytes=%d readonly=%t", r.Path, r.SHA256, r.Bytes, r.ReadOnly)
}

// handler serves /healthz and /module.
func handler(rep report) http.Handler {
	body, _ := json.MarshalIndent(rep, "", "  ")
	body = append(body, '\n')
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok")
	})
	mux.HandleFunc("GET /module", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})
	return mux
}

func main() {
	module := flag.String("module", DefaultModule, "the proxy-wasm module file to load at start (empty: none)")
	listen := flag.String("listen", ":8080", "address to serve /healthz and /module on")
	check := flag.Bool("check", false, "load the module, print the report as JSON and exit (0 if it started) instead of serving")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "wasm-gateway: error: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	os.Exit(run(*module, *listen, *check, os.Stdout, os.Stderr))
}

// run is main, returning the exit code.
func run(module, listen string, check bool, stdout, stderr io.Writer) int {
	if module == "" {
		return serveWithoutModule(listen, check, stdout, stderr)
	}
	var mu sync.Mutex
	rep, err := loadWith(module, hooks{
		read: func(r report) { fmt.Fprintln(stdout, loadedLine(r)) },
		log: func(level uint32, msg string) {
			mu.Lock()
			defer mu.Unlock()
			fmt.Fprintf(stdout, "wasm-gateway: module log %s: %s\n", levelName(level), msg)
		},
	})
	if check {
		j, _ := json.MarshalIndent(rep, "", "  ")
		fmt.Fprintf(stdout, "%s\n", j)
	}
	if err != nil {
		fmt.Fprintf(stderr, "wasm-gateway: error: %v\n", err)
		return 1
	}
	if check {
		fmt.Fprintf(stdout, "wasm-gateway: started abi=%s vm_start=%d\n", rep.ABIVersion, rep.VMStartResult)
		return 0
	}

	ln, err := net.Listen("tcp", listen)
	if err != nil {
		fmt.Fprintf(stderr, "wasm-gateway: error: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "wasm-gateway: started abi=%s vm_start=%d listening on %s\n", rep.ABIVersion, rep.VMStartResult, ln.Addr())
	return serve(ln, rep, stdout, stderr)
}

// serveWithoutModule is run with no module: the baseline.
func serveWithoutModule(listen string, check bool, stdout, stderr io.Writer) int {
	if check {
		fmt.Fprintln(stdout, "wasm-gateway: started without a module")
		return 0
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		fmt.Fprintf(stderr, "wasm-gateway: error: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "wasm-gateway: started without a module listening on %s\n", ln.Addr())
	return serve(ln, report{Log: []string{}}, stdout, stderr)
}

// serve answers /healthz and /module on ln until SIGTERM or SIGINT.
func serve(ln net.Listener, rep report, stdout, stderr io.Writer) int {
	srv := &http.Server{Handler: handler(rep), ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		fmt.Fprintf(stderr, "wasm-gateway: error: serve: %v\n", err)
		return 1
	case <-ctx.Done():
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(shutdown)
	fmt.Fprintln(stdout, "wasm-gateway: stopped")
	return 0
}
