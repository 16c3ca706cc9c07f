package wasmcheck

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

var allModes = []Mode{None, Wasm, ProxyWasm}

// verdict is what each mode must say about a module: "" passes, anything
// else is a refusal whose message contains every "|"-separated part.
type verdict struct{ none, wasm, proxy string }

func (v verdict) of(mode Mode) string {
	switch mode {
	case None:
		return v.none
	case Wasm:
		return v.wasm
	}
	return v.proxy
}

var (
	passAll   = verdict{}
	proxyOnly = func(msg string) verdict { return verdict{proxy: msg} }
	wasmUp    = func(msg string) verdict { return verdict{wasm: msg, proxy: msg} }
	allRefuse = func(msg string) verdict { return verdict{msg, msg, msg} }
)

func writeModule(t testing.TB, mod []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "plugin.wasm")
	if err := os.WriteFile(path, mod, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// checkVerdict validates path in every mode and checks the outcomes. It
// also validates with every function body compiled on its own
// (compileModule's chunking), which must not change any outcome.
func checkVerdict(t *testing.T, path string, want verdict) {
	t.Helper()
	checkVerdictChunked(t, path, want, 1)
}

// checkVerdictChunked is checkVerdict comparing with chunks of chunk bytes.
func checkVerdictChunked(t *testing.T, path string, want verdict, chunk int) {
	t.Helper()
	for _, mode := range allModes {
		err := CheckFile(path, mode)
		if chunked := checkFile(path, mode, chunk); errString(chunked) != errString(err) {
			t.Errorf("mode %s: chunked validation says %v, unchunked %v", mode, chunked, err)
		}
		wantMsg := want.of(mode)
		if wantMsg == "" {
			if err != nil {
				t.Errorf("mode %s: refused: %v", mode, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("mode %s: passed, want a refusal mentioning %q", mode, wantMsg)
			continue
		}
		var e *errdefs.Error
		if !errors.Is(err, errdefs.ErrInvalidModule) || !errors.As(err, &e) || e.Kind != errdefs.ErrInvalidModule {
			t.Errorf("mode %s: error %v (%T) is not a *errdefs.Error of kind errdefs.ErrInvalidModule", mode, err, err)
			continue
		}
		if !strings.HasPrefix(e.Msg, "module ") {
			t.Errorf("mode %s: message %q does not start with \"module \"", mode, e.Msg)
		}
		for _, part := range strings.Split(wantMsg, "|") {
			if !strings.Contains(e.Msg, part) {
				t.Errorf("mode %s: message %q does not mention %q", mode, e.Msg, part)
			}
		}
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

func TestValidateGeneratedModules(t *testing.T) {
	const unknownImport = "not_a_proxy_wasm_function"
	imp := func(module, name string, params, results int) wasmgen.Options {
		return wasmgen.Options{Imports: []wasmgen.Import{{Module: module, Name: name, Params: params, Results: results}}}
	}
	withABI := func(abi string, o wasmgen.Options) wasmgen.Options { o.ABIExport = abi; return o }

	for _, tc := range []struct {
		name string
		mod  []byte
		want verdict
	}{
		{"sample", wasmgen.ProxyWasm(wasmgen.Options{}), passAll},
		{"garbage", wasmgen.Garbage(10_000), allRefuse("magic bytes")},
		{"garbage short", wasmgen.Garbage(4), allRefuse("4 bytes long, too short")},
		{"empty", nil, allRefuse("0 bytes long")},
		{"truncated", wasmgen.Truncated(), wasmUp("truncated|push the complete module")},
		{"header only", []byte("\x00asm\x01\x00\x00\x00"), proxyOnly("does not export a proxy_abi_version_* function: build it with a proxy-wasm SDK")},
		{"component", []byte("\x00asm\x0d\x00\x01\x00rest"), allRefuse("component|core module")},
		{"version 2", []byte("\x00asm\x02\x00\x00\x00"), allRefuse("version 0x2")},

		{"no ABI export", wasmgen.ProxyWasm(wasmgen.Options{OmitABIExport: true}),
			proxyOnly("does not export a proxy_abi_version_* function: build it with a proxy-wasm SDK")},
		{"unknown ABI version", wasmgen.ProxyWasm(wasmgen.Options{ABIExport: "proxy_abi_version_9_9_9"}),
			proxyOnly("exports proxy_abi_version_9_9_9, an ABI version Envoy does not implement")},
		{"ABI 0.1.0", wasmgen.ProxyWasm(wasmgen.Options{ABIExport: "proxy_abi_version_0_1_0"}), passAll},
		{"ABI 0.2.0", wasmgen.ProxyWasm(wasmgen.Options{ABIExport: "proxy_abi_version_0_2_0"}), passAll},

		{"unknown env import", wasmgen.ProxyWasm(wasmgen.Options{ExtraEnvImport: unknownImport}),
			proxyOnly("imports env." + unknownImport + ", which Envoy does not provide")},
		{"wrong import type", wasmgen.ProxyWasm(imp("env", "proxy_get_property", 1, 1)),
			proxyOnly("imports env.proxy_get_property with type (i32)->i32|(i32,i32,i32,i32)->i32")},
		{"ABI 0.1.0 import", wasmgen.ProxyWasm(withABI("proxy_abi_version_0_1_0", imp("env", "proxy_continue_request", 0, 1))), passAll},
		{"ABI 0.1.0 import in 0.2.1", wasmgen.ProxyWasm(imp("env", "proxy_continue_request", 0, 1)),
			proxyOnly("env.proxy_continue_request, which Envoy provides only to modules exporting proxy_abi_version_0_1_0|this one exports proxy_abi_version_0_2_1")},
		{"ABI 0.2.1 import", wasmgen.ProxyWasm(imp("env", "proxy_get_log_level", 1, 1)), passAll},
		{"ABI 0.2.1 import in 0.2.0", wasmgen.ProxyWasm(withABI("proxy_abi_version_0_2_0", imp("env", "proxy_get_log_level", 1, 1))),
			proxyOnly("env.proxy_get_log_level, which Envoy provides only to modules exporting proxy_abi_version_0_2_1")},
		{"unknown ABI, known import", wasmgen.ProxyWasm(withABI("proxy_abi_version_9", imp("env", "proxy_continue_stream", 1, 1))),
			proxyOnly("proxy_abi_version_9")},
		{"emscripten and envoy imports", wasmgen.ProxyWasm(wasmgen.Options{Imports: []wasmgen.Import{
			{Module: "env", Name: "emscripten_notify_memory_growth", Params: 1},
			{Module: "env", Name: "pthread_equal", Params: 2, Results: 1},
			{Module: "env", Name: "envoy_resolve_dns", Params: 3, Results: 1},
		}}), passAll},

		{"wasi_snapshot_preview1 import", wasmgen.ProxyWasm(imp("wasi_snapshot_preview1", "fd_write", 4, 1)), passAll},
		{"wasi_unstable import", wasmgen.ProxyWasm(imp("wasi_unstable", "proc_exit", 1, 0)), passAll},
		{"unknown WASI import", wasmgen.ProxyWasm(imp("wasi_snapshot_preview1", "sock_open", 3, 1)),
			proxyOnly("imports wasi_snapshot_preview1.sock_open, a WASI function Envoy does not provide")},
		{"WASI path_link as WASI types it", wasmgen.ProxyWasm(imp("wasi_snapshot_preview1", "path_link", 7, 1)),
			proxyOnly("path_link with type (i32,i32,i32,i32,i32,i32,i32)->i32")},
		{"import from module foo", wasmgen.ProxyWasm(imp("foo", "bar", 0, 0)),
			proxyOnly("imports foo.bar, but Envoy links imports only from the modules env, wasi_snapshot_preview1 and wasi_unstable")},

		{"no memory export", wasmgen.ProxyWasm(wasmgen.Options{OmitMemoryExport: true}),
			proxyOnly("does not export its memory")},
		{"no allocator", wasmgen.ProxyWasm(wasmgen.Options{OmitAllocatorExports: true}),
			proxyOnly("exports neither malloc nor proxy_on_memory_allocate")},
		{"memory 1 GiB", wasmgen.ProxyWasm(wasmgen.Options{MinMemoryPages: 16384}), passAll},
		{"memory 4 GiB", wasmgen.ProxyWasm(wasmgen.Options{MinMemoryPages: 65536}),
			wasmUp("asks for more memory than Envoy gives a module (16384 pages, 1 GiB)|65536 pages|lower its initial memory")},

		{"several problems", wasmgen.ProxyWasm(wasmgen.Options{OmitABIExport: true, OmitMemoryExport: true, ExtraEnvImport: unknownImport}),
			proxyOnly("proxy_abi_version_*|does not export its memory|env." + unknownImport)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkVerdict(t, writeModule(t, tc.mod), tc.want)
		})
	}
}

func TestValidateCommittedPlugin(t *testing.T) {
	checkVerdict(t, filepath.Join("..", "..", "test", "testdata", "plugin.wasm"), passAll)
}

func TestValidateTooManyProblems(t *testing.T) {
	var imports []wasmgen.Import
	for _, name := range []string{"a", "b", "c", "d", "e", "f", "g"} {
		imports = append(imports, wasmgen.Import{Module: "env", Name: name})
	}
	err := CheckFile(writeModule(t, wasmgen.ProxyWasm(wasmgen.Options{Imports: imports})), ProxyWasm)
	if err == nil || !strings.Contains(err.Error(), "env.e") || strings.Contains(err.Error(), "env.f,") ||
		!strings.Contains(err.Error(), "and 2 more problems") {
		t.Errorf("got %v, want the first 5 problems and a count of the others", err)
	}
}

// Hand-made modules, for what wasmgen does not generate: other import
// kinds, i64 types, Wasm 2.0 instructions, custom sections.

const (
	valI32 = 0x7F
	valI64 = 0x7E
)

func leb(v int) []byte           { return binary.AppendUvarint(nil, uint64(v)) }
func str(s string) []byte        { return append(leb(len(s)), s...) }
func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
func vec(items ...[]byte) []byte { return cat(append([][]byte{leb(len(items))}, items...)...) }
func section(id byte, payload ...[]byte) []byte {
	p := cat(payload...)
	return cat([]byte{id}, leb(len(p)), p)
}
func custom(name string, payload []byte) []byte { return section(0, str(name), payload) }
func fnType(params, results []byte) []byte {
	return cat([]byte{0x60}, vec(splitBytes(params)...), vec(splitBytes(results)...))
}
func splitBytes(b []byte) [][]byte {
	out := make([][]byte, len(b))
	for i := range b {
		out[i] = b[i : i+1]
	}
	return out
}

// handImport is an import of a hand-made module: a function of type fn,
// or else the raw kind and descriptor desc.
type handImport struct {
	module, name string
	fn           []byte
	desc         []byte
}

type handModule struct {
	imports   []handImport
	memory    bool     // define and export one page of memory
	body      []byte   // instructions of an extra ()->() function
	bodies    [][]byte // instructions of more ()->() functions
	custom    [][]byte
	abiExport string
}

// encode builds a minimal proxy-wasm module: an ABI export, malloc
// (i32)->i32, and what h adds.
func (h handModule) encode() []byte {
	types := [][]byte{fnType(nil, nil), fnType([]byte{valI32}, []byte{valI32})}
	var imports [][]byte
	nFuncs := 0
	for _, im := range h.imports {
		desc := im.desc
		if im.fn != nil {
			types = append(types, im.fn)
			desc = cat([]byte{0x00}, leb(len(types)-1))
			nFuncs++
		}
		imports = append(imports, cat(str(im.module), str(im.name), desc))
	}
	funcs := [][]byte{leb(0), leb(1)}
	code := [][]byte{cat(leb(2), []byte{0x00, 0x0B}), cat(leb(4), []byte{0x00, 0x20, 0x00, 0x0B})}
	bodies := h.bodies
	if h.body != nil {
		bodies = append([][]byte{h.body}, bodies...)
	}
	for _, body := range bodies {
		funcs = append(funcs, leb(0))
		b := cat([]byte{0x00}, body, []byte{0x0B})
		code = append(code, cat(leb(len(b)), b))
	}
	abi := h.abiExport
	if abi == "" {
		abi = wasmgen.ABIVersionExport
	}
	exports := [][]byte{
		cat(str(abi), []byte{0x00}, leb(nFuncs)),
		cat(str("malloc"), []byte{0x00}, leb(nFuncs+1)),
	}
	out := cat([]byte("\x00asm\x01\x00\x00\x00"), section(1, vec(types...)))
	if len(imports) > 0 {
		out = cat(out, section(2, vec(imports...)))
	}
	out = cat(out, section(3, vec(funcs...)))
	if h.memory {
		out = cat(out, section(5, vec([]byte{0x00, 0x01})))
		exports = append(exports, cat(str("memory"), []byte{0x02, 0x00}))
	}
	out = cat(out, section(7, vec(exports...)), section(10, vec(code...)))
	return cat(out, cat(h.custom...))
}

func TestValidateHandMadeModules(t *testing.T) {
	v128Zero := make([]byte, 16)
	for _, tc := range []struct {
		name string
		mod  handModule
		want verdict
	}{
		{"minimal", handModule{memory: true}, passAll},
		{"global import", handModule{memory: true, imports: []handImport{
			{module: "env", name: "__stack_pointer", desc: []byte{0x03, valI32, 0x01}}}},
			proxyOnly("imports the global env.__stack_pointer, and Envoy links no imported globals")},
		{"imported memory", handModule{imports: []handImport{
			{module: "env", name: "memory", desc: []byte{0x02, 0x00, 0x01}}}}, passAll},
		{"imported memory over 1 GiB", handModule{imports: []handImport{
			{module: "env", name: "memory", desc: cat([]byte{0x02, 0x00}, leb(16385))}}},
			wasmUp("asks for more memory than Envoy gives a module (16384 pages, 1 GiB)|imported memory env.memory starts at 16385 pages|lower its initial memory")},
		{"imported memory of 1 GiB", handModule{imports: []handImport{
			{module: "env", name: "memory", desc: cat([]byte{0x02, 0x00}, leb(16384))}}}, passAll},
		{"imported table", handModule{memory: true, imports: []handImport{
			{module: "env", name: "table", desc: []byte{0x01, 0x70, 0x00, 0x01}}}}, passAll},
		{"i64 import", handModule{memory: true, imports: []handImport{
			{module: "env", name: "proxy_increment_metric", fn: fnType([]byte{valI32, valI64}, []byte{valI32})},
			{module: "wasi_snapshot_preview1", name: "fd_seek", fn: fnType([]byte{valI32, valI64, valI32, valI32}, []byte{valI32})}}},
			passAll},
		{"i64 import with i32", handModule{memory: true, imports: []handImport{
			{module: "env", name: "proxy_increment_metric", fn: fnType([]byte{valI32, valI32}, []byte{valI32})}}},
			proxyOnly("proxy_increment_metric with type (i32,i32)->i32, but Envoy's env.proxy_increment_metric has type (i32,i64)->i32")},
		{"ABI export order", handModule{memory: true, abiExport: "proxy_abi_version_0_1_0", imports: []handImport{
			{module: "env", name: "proxy_get_configuration", fn: fnType([]byte{valI32, valI32}, []byte{valI32})}}},
			passAll},
		{"Wasm 2.0 instructions", handModule{memory: true, body: cat(
			[]byte{0x41, 0x01, 0xC0, 0x1A},             // i32.extend8_s (sign extension)
			[]byte{0xFD, 0x0C}, v128Zero, []byte{0x1A}, // v128.const (SIMD)
			[]byte{0x41, 0x00, 0x41, 0x00, 0x41, 0x00, 0xFC, 0x0B, 0x00}, // memory.fill (bulk memory)
			[]byte{0x43, 0, 0, 0, 0, 0xFC, 0x00, 0x1A},                   // i32.trunc_sat_f32_s (non-trapping)
			[]byte{0xD0, 0x70, 0x1A},                                     // ref.null func (reference types)
		)}, passAll},
		{"threads", handModule{memory: true, body: []byte{0xFE, 0x03, 0x00}}, // atomic.fence
			wasmUp("is not valid WebAssembly")},
		{"name section", handModule{memory: true, custom: [][]byte{
			custom("name", cat([]byte{0x01}, leb(len(vec(cat(leb(0), str("abi"))))), vec(cat(leb(0), str("abi")))))}},
			passAll},
		{"custom sections", handModule{memory: true, custom: [][]byte{
			custom("producers", []byte("whatever")), custom("", nil), custom(strings.Repeat("é", 5000), []byte{1, 2, 3})}},
			passAll},
		{"custom section name not UTF-8", handModule{memory: true, custom: [][]byte{
			custom(strings.Repeat("é", 2500)+"\xff"+strings.Repeat("é", 2500), nil)}},
			wasmUp("not UTF-8")},
		{"custom section name split rune not UTF-8", handModule{memory: true, custom: [][]byte{
			custom(strings.Repeat("a", 4095)+"\xc3", nil)}},
			wasmUp("not UTF-8")},
		{"custom section name too long", handModule{memory: true, custom: [][]byte{
			{0x00, 0x03, 0x05, 'a', 'b'}}},
			wasmUp("longer than the section")},
		{"custom section overruns", handModule{memory: true, custom: [][]byte{
			{0x00, 0x7F, 0x01, 'a'}}},
			wasmUp("truncated")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkVerdict(t, writeModule(t, tc.mod.encode()), tc.want)
		})
	}
}

// TestValidateLargeCode: a code section larger than chunkBytes is validated
// in chunks, and a bad body is found, and named, in any of them.
func TestValidateLargeCode(t *testing.T) {
	// 1200 functions of about 500 bytes each: about 600 KiB, 3 chunks.
	var body []byte
	for range 80 {
		body = append(body, 0x41, 0x07, 0x41, 0x05, 0x6A, 0x1A) // i32.const 7; i32.const 5; i32.add; drop
	}
	const n = 1200
	bodies := make([][]byte, n)
	for i := range bodies {
		bodies[i] = body
	}
	mod := handModule{memory: true, bodies: bodies}
	if size := len(mod.encode()); size < 2*chunkBytes {
		t.Fatalf("module of %d bytes is too small to need chunks", size)
	}
	// Compare with small chunks too (not single functions: that would
	// compile the 1200-function module 1200 times).
	const small = 32 << 10
	checkVerdictChunked(t, writeModule(t, mod.encode()), passAll, small)

	for _, bad := range []int{0, n / 2, n - 1} {
		bodies := append([][]byte(nil), bodies...)
		bodies[bad] = []byte{0x6A} // i32.add on an empty stack
		path := writeModule(t, handModule{memory: true, bodies: bodies}.encode())
		// The hand-made module defines the ABI function and malloc first.
		checkVerdictChunked(t, path, wasmUp(fmt.Sprintf("is not valid WebAssembly: invalid function[%d]", bad+2)), small)
	}
}

// TestValidatePaddedModule: custom sections of tens of MiB validate, and are
// not read into memory.
func TestValidatePaddedModule(t *testing.T) {
	const size = 16 << 20
	path := filepath.Join(t.TempDir(), "padded.wasm")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := wasmgen.WriteProxyWasm(f, wasmgen.Options{PadTo: size}); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	checkVerdict(t, path, passAll)
	for _, mode := range allModes {
		if alloc := allocated(t, func() error { return CheckFile(path, mode) }); alloc > 2<<20 {
			t.Errorf("mode %s: validating a %d MiB module allocated %d KiB", mode, size>>20, alloc>>10)
		}
	}
}

// TestMemoryOverLimitIsSentinel: the memory refusal is recognised by
// errors.Is on errMemoryOverLimit, not by wazero's message.
func TestMemoryOverLimitIsSentinel(t *testing.T) {
	for _, tc := range []struct {
		mod  []byte
		want bool
	}{
		{wasmgen.ProxyWasm(wasmgen.Options{MinMemoryPages: 16384}), false},
		{wasmgen.ProxyWasm(wasmgen.Options{MinMemoryPages: 16385}), true},
	} {
		m, err := parseModule(tc.mod)
		if err != nil {
			t.Fatal(err)
		}
		if got := errors.Is(m.checkMemory(), errMemoryOverLimit); got != tc.want {
			t.Errorf("memories %v: over the limit %v, want %v", m.memories, got, tc.want)
		}
	}
}

// TestValidateHugeMemory: a module declaring a huge memory is validated
// without that memory being allocated.
func TestValidateHugeMemory(t *testing.T) {
	for _, pages := range []uint32{16384, 65536} {
		path := writeModule(t, wasmgen.ProxyWasm(wasmgen.Options{MinMemoryPages: pages}))
		for _, mode := range allModes {
			alloc := allocated(t, func() error { CheckFile(path, mode); return nil })
			if alloc > 2<<20 {
				t.Errorf("%d pages, mode %s: validation allocated %d MiB", pages, mode, alloc>>20)
			}
		}
	}
}

// allocated returns how many heap bytes f allocated.
func allocated(t *testing.T, f func() error) uint64 {
	t.Helper()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if err := f(); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestValidateNoneReadsHeaderOnly: mode none reads 8 bytes and no more, so
// a FIFO holding just a header (its writer still open) does not block it.
func TestValidateNoneReadsHeaderOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fifo.wasm")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- CheckFile(path, None) }()
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.Write([]byte("\x00asm\x01\x00\x00\x00")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("refused: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("mode none is still reading after the header")
	}

	// A header followed by garbage passes too: nothing else is looked at.
	checkVerdict(t, writeModule(t, cat([]byte("\x00asm\x01\x00\x00\x00"), wasmgen.Garbage(1000))),
		wasmUp("push the complete module")) // the garbage reads as a section overrunning the file
}

func TestValidateErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.wasm")
	if err := CheckFile(missing, None); !errors.Is(err, errdefs.ErrInternal) || errors.Is(err, errdefs.ErrInvalidModule) {
		t.Errorf("missing file: got %v, want errdefs.ErrInternal", err)
	}
	sample := writeModule(t, wasmgen.ProxyWasm(wasmgen.Options{}))
	if err := CheckFile(sample, "bogus"); !errors.Is(err, errdefs.ErrInternal) {
		t.Errorf("mode bogus: got %v, want errdefs.ErrInternal", err)
	}
	if err := CheckFile(sample, ""); err != nil {
		t.Errorf("mode \"\" (proxy-wasm): %v", err)
	}
	if err := CheckFile(writeModule(t, wasmgen.ProxyWasm(wasmgen.Options{OmitABIExport: true})), ""); !errors.Is(err, errdefs.ErrInvalidModule) {
		t.Errorf("mode \"\" is not proxy-wasm: %v", err)
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{
		"": ProxyWasm, "proxy-wasm": ProxyWasm, "wasm": Wasm, "none": None, " wasm ": Wasm,
	} {
		if got, err := ParseMode(in); got != want || err != nil {
			t.Errorf("ParseMode(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"bogus", "Wasm", "proxy_wasm", "off"} {
		if got, err := ParseMode(in); err == nil || !strings.Contains(err.Error(), "proxy-wasm") {
			t.Errorf("ParseMode(%q) = %q, %v; want an error listing the modes", in, got, err)
		}
	}
}

// TestValidateWASITypes checks the WASI table against wazero's own
// wasi_snapshot_preview1, an independent source of WASI's types: they
// agree except where Envoy deviates from WASI.
func TestValidateWASITypes(t *testing.T) {
	ctx := context.Background()
	r := wazero.NewRuntimeWithConfig(ctx, wazero.NewRuntimeConfigInterpreter())
	defer r.Close(ctx)
	cm, err := wasi_snapshot_preview1.NewBuilder(r).Compile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wasi := cm.ExportedFunctions()
	envoyDeviates := map[string]bool{"path_link": true, "path_symlink": true}
	for name, typ := range wasiHostFunctions {
		def, ok := wasi[name]
		if !ok {
			t.Errorf("%s is not a WASI preview1 function", name)
			continue
		}
		if same := funcType(def) == typ; same == envoyDeviates[name] {
			t.Errorf("%s: table has %s, WASI has %s (Envoy deviates: %v)", name, typ, funcType(def), envoyDeviates[name])
		}
	}
	if len(wasiHostFunctions) != 45 {
		t.Errorf("%d WASI functions, want the 45 of FOR_ALL_WASI_FUNCTIONS", len(wasiHostFunctions))
	}
	if n := len(envHostFunctions); n != 3+36 {
		t.Errorf("%d env functions, want 3 + the 36 of FOR_ALL_HOST_FUNCTIONS", n)
	}
}

// FuzzParseModule: the module's own section reading runs on the bytes a
// registry sent before wazero has validated them, so on any input it
// returns (a module or an error) without panicking, and its memory check
// only ever reports errMemoryOverLimit.
func FuzzParseModule(f *testing.F) {
	f.Add(wasmgen.ProxyWasm(wasmgen.Options{}))
	f.Add(wasmgen.ProxyWasm(wasmgen.Options{MinMemoryPages: 65536}))
	f.Add(wasmgen.Truncated())
	f.Add([]byte("\x00asm\x01\x00\x00\x00\x02\x05\x01\x00\x00\x02\x00"))
	f.Fuzz(func(t *testing.T, code []byte) {
		if len(code) < HeaderSize {
			return
		}
		m, err := parseModule(code)
		if err != nil {
			return
		}
		if err := m.checkMemory(); err != nil && !errors.Is(err, errMemoryOverLimit) {
			t.Fatalf("checkMemory: %v", err)
		}
		parseCodeLayout(code)
	})
}
