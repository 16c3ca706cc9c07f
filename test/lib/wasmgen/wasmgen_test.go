package wasmgen

import (
	"bytes"
	"context"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
)

// wantSignatures returns the exports every valid module must have, with
// their proxy-wasm ABI 0.2.1 signatures as (param count, result count); all
// values are i32.
func wantSignatures() map[string][2]int {
	return map[string][2]int{
		ABIVersionExport:            {0, 0},
		"malloc":                    {1, 1},
		"proxy_on_memory_allocate":  {1, 1},
		"proxy_on_vm_start":         {2, 1},
		"proxy_on_configure":        {2, 1},
		"proxy_on_context_create":   {2, 0},
		"proxy_on_request_headers":  {3, 1},
		"proxy_on_response_headers": {3, 1},
		"proxy_on_done":             {1, 1},
		"proxy_on_log":              {1, 0},
		"proxy_on_delete":           {1, 0},
		"proxy_on_tick":             {1, 0},
	}
}

func newRuntime(t testing.TB, cfg wazero.RuntimeConfig) wazero.Runtime {
	t.Helper()
	if cfg == nil {
		cfg = wazero.NewRuntimeConfigInterpreter()
	}
	r := wazero.NewRuntimeWithConfig(context.Background(), cfg)
	t.Cleanup(func() { r.Close(context.Background()) })
	return r
}

func compile(t testing.TB, r wazero.Runtime, mod []byte) wazero.CompiledModule {
	t.Helper()
	cm, err := r.CompileModule(context.Background(), mod)
	if err != nil {
		t.Fatalf("CompileModule: %v", err)
	}
	return cm
}

type logEntry struct {
	level uint32
	msg   string
}

// instantiate instantiates mod with a host "env" module whose proxy_log
// records what the guest logs.
func instantiate(t *testing.T, mod []byte) (api.Module, *[]logEntry) {
	t.Helper()
	ctx := context.Background()
	r := newRuntime(t, nil)
	logs := &[]logEntry{}
	_, err := r.NewHostModuleBuilder("env").
		NewFunctionBuilder().
		WithFunc(func(_ context.Context, m api.Module, level, ptr, size uint32) uint32 {
			b, ok := m.Memory().Read(ptr, size)
			if !ok {
				return 2 // INVALID_MEMORY_ACCESS... any non-OK status
			}
			*logs = append(*logs, logEntry{level, string(b)})
			return 0 // OK
		}).
		Export("proxy_log").
		Instantiate(ctx)
	if err != nil {
		t.Fatalf("instantiate env: %v", err)
	}
	m, err := r.Instantiate(ctx, mod)
	if err != nil {
		t.Fatalf("instantiate module: %v", err)
	}
	return m, logs
}

func callI32(t *testing.T, m api.Module, name string, args ...uint64) []uint64 {
	t.Helper()
	f := m.ExportedFunction(name)
	if f == nil {
		t.Fatalf("no exported function %q", name)
	}
	res, err := f.Call(context.Background(), args...)
	if err != nil {
		t.Fatalf("%s%v: %v", name, args, err)
	}
	return res
}

func TestExports(t *testing.T) {
	cm := compile(t, newRuntime(t, nil), ProxyWasm(Options{}))

	fns := cm.ExportedFunctions()
	signatures := wantSignatures()
	if len(fns) != len(signatures) {
		t.Errorf("got %d exported functions, want %d: %v", len(fns), len(signatures), slices.Sorted(maps.Keys(fns)))
	}
	for name, sig := range signatures {
		def, ok := fns[name]
		if !ok {
			t.Errorf("missing export %s", name)
			continue
		}
		if !allI32(def.ParamTypes(), sig[0]) || !allI32(def.ResultTypes(), sig[1]) {
			t.Errorf("%s: params %v results %v, want %d and %d i32", name,
				def.ParamTypes(), def.ResultTypes(), sig[0], sig[1])
		}
	}

	mems := cm.ExportedMemories()
	mem, ok := mems["memory"]
	if len(mems) != 1 || !ok {
		t.Fatalf("exported memories = %v, want just \"memory\"", slices.Sorted(maps.Keys(mems)))
	}
	if mem.Min() < 1 {
		t.Errorf("memory min = %d pages, want >= 1", mem.Min())
	}

	imps := cm.ImportedFunctions()
	if len(imps) != 1 {
		t.Fatalf("got %d imports, want 1 (env.proxy_log)", len(imps))
	}
	mod, name, _ := imps[0].Import()
	if mod != "env" || name != "proxy_log" || !allI32(imps[0].ParamTypes(), 3) || !allI32(imps[0].ResultTypes(), 1) {
		t.Errorf("import = %s.%s %v -> %v, want env.proxy_log (i32,i32,i32) -> i32",
			mod, name, imps[0].ParamTypes(), imps[0].ResultTypes())
	}
}

func TestCallbacks(t *testing.T) {
	m, logs := instantiate(t, ProxyWasm(Options{}))

	if got := callI32(t, m, "proxy_on_vm_start", 0, 0); got[0] != 1 {
		t.Errorf("proxy_on_vm_start = %d, want 1", got[0])
	}
	want := []logEntry{{logLevelInfo, DefaultMessage}}
	if !slices.Equal(*logs, want) {
		t.Errorf("logged %+v, want %+v", *logs, want)
	}

	callI32(t, m, ABIVersionExport)
	if got := callI32(t, m, "proxy_on_configure", 1, 0); got[0] != 1 {
		t.Errorf("proxy_on_configure = %d, want 1", got[0])
	}
	callI32(t, m, "proxy_on_context_create", 1, 0)
	callI32(t, m, "proxy_on_context_create", 2, 1)
	if got := callI32(t, m, "proxy_on_request_headers", 2, 5, 1); got[0] != 0 {
		t.Errorf("proxy_on_request_headers = %d, want 0 (Continue)", got[0])
	}
	if got := callI32(t, m, "proxy_on_response_headers", 2, 5, 1); got[0] != 0 {
		t.Errorf("proxy_on_response_headers = %d, want 0 (Continue)", got[0])
	}
	if got := callI32(t, m, "proxy_on_done", 2); got[0] != 1 {
		t.Errorf("proxy_on_done = %d, want 1", got[0])
	}
	callI32(t, m, "proxy_on_log", 2)
	callI32(t, m, "proxy_on_delete", 2)
	callI32(t, m, "proxy_on_tick", 1)
	if len(*logs) != 1 {
		t.Errorf("callbacks other than proxy_on_vm_start logged: %+v", (*logs)[1:])
	}
}

func TestCustomMessage(t *testing.T) {
	msg := strings.Repeat("a long message that spans pages ", 4000) // > 64 KiB
	m, logs := instantiate(t, ProxyWasm(Options{Message: msg}))
	if got := callI32(t, m, "proxy_on_vm_start", 0, 0); got[0] != 1 {
		t.Errorf("proxy_on_vm_start = %d, want 1", got[0])
	}
	if len(*logs) != 1 || (*logs)[0].msg != msg {
		t.Errorf("did not log the custom message (%d entries)", len(*logs))
	}
	// The heap must start after the message.
	if p := callI32(t, m, "malloc", 8)[0]; p < uint64(msgOffset+len(msg)) {
		t.Errorf("malloc returned %d, inside the message at [%d,%d)", p, msgOffset, msgOffset+len(msg))
	}
}

func TestAllocate(t *testing.T) {
	m, _ := instantiate(t, ProxyWasm(Options{}))
	mem := m.Memory()

	type block struct{ ptr, size uint32 }
	var blocks []block
	for i, size := range []uint32{0, 1, 100, 3 * pageSize, 7, 1 << 20} {
		name := "proxy_on_memory_allocate"
		if i%2 == 1 {
			name = "malloc"
		}
		ptr := uint32(callI32(t, m, name, uint64(size))[0])
		if ptr == 0 || ptr%8 != 0 {
			t.Fatalf("%s(%d) = %d, want a non-zero 8-byte aligned pointer", name, size, ptr)
		}
		if ptr < uint32(msgOffset+len(DefaultMessage)) {
			t.Fatalf("%s(%d) = %d overlaps the message", name, size, ptr)
		}
		// The block must be writable, which needs the memory to have grown.
		if !mem.Write(ptr, bytes.Repeat([]byte{byte(i + 1)}, int(size))) {
			t.Fatalf("%s(%d) = %d: block not in memory of %d bytes", name, size, ptr, mem.Size())
		}
		blocks = append(blocks, block{ptr, size})
	}
	for i, b := range blocks {
		for _, o := range blocks[i+1:] {
			if b.ptr < o.ptr+o.size && o.ptr < b.ptr+b.size {
				t.Errorf("blocks %+v and %+v overlap", b, o)
			}
		}
		if got, _ := mem.Read(b.ptr, b.size); !bytes.Equal(got, bytes.Repeat([]byte{byte(i + 1)}, int(b.size))) {
			t.Errorf("block %+v was overwritten", b)
		}
	}

	// Impossible requests fail with 0 instead of trapping.
	for _, size := range []uint64{0xFFFFFFFF, 0x80000000} {
		if p := callI32(t, m, "malloc", size)[0]; p != 0 {
			t.Errorf("malloc(%#x) = %d, want 0", size, p)
		}
	}
}

func TestPadTo(t *testing.T) {
	base := len(ProxyWasm(Options{}))
	minPad := 2 + 1 + len(PadSectionName) + 1 // id, size, name, 1 filler byte
	// Sizes around the LEB128 length boundaries of the section size
	// (127/128 and 16383/16384 payload bytes), plus a larger one.
	sizes := []int{base + minPad, base + minPad + 1, 1 << 20}
	for _, edge := range []int{128, 16384} {
		for d := -3; d <= 3; d++ {
			sizes = append(sizes, base+edge+d)
		}
	}
	cfg := wazero.NewRuntimeConfigInterpreter().WithCustomSections(true)
	r := newRuntime(t, cfg)
	for _, size := range sizes {
		mod := ProxyWasm(Options{PadTo: size})
		if len(mod) != size {
			t.Errorf("PadTo %d: got %d bytes", size, len(mod))
			continue
		}
		if !bytes.HasPrefix(mod, ProxyWasm(Options{})) {
			t.Errorf("PadTo %d: does not start with the unpadded module", size)
		}
		cm := compile(t, r, mod)
		var names []string
		for _, cs := range cm.CustomSections() {
			names = append(names, cs.Name())
		}
		if !slices.Equal(names, []string{PadSectionName}) {
			t.Errorf("PadTo %d: custom sections %q, want [%q]", size, names, PadSectionName)
		}
		if _, ok := cm.ExportedFunctions()[ABIVersionExport]; !ok {
			t.Errorf("PadTo %d: lost the ABI export", size)
		}
	}

	if _, err := WriteProxyWasm(io.Discard, Options{PadTo: base + minPad - 1}); err == nil {
		t.Errorf("PadTo %d (too small) did not fail", base+minPad-1)
	}
	if _, err := WriteProxyWasm(io.Discard, Options{PadTo: 1}); err == nil {
		t.Errorf("PadTo 1 did not fail")
	}
}

func TestPadTo64MiB(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB module")
	}
	const size = 64 << 20
	var buf bytes.Buffer
	n, err := WriteProxyWasm(&buf, Options{PadTo: size})
	if err != nil || n != size || buf.Len() != size {
		t.Fatalf("WriteProxyWasm = %d, %v (buffer %d bytes), want %d", n, err, buf.Len(), size)
	}
	if !bytes.Equal(buf.Bytes(), ProxyWasm(Options{PadTo: size})) {
		t.Errorf("WriteProxyWasm and ProxyWasm differ")
	}
	compile(t, newRuntime(t, nil), buf.Bytes())
}

func TestWriteProxyWasmMatches(t *testing.T) {
	for _, opts := range []Options{{}, {Message: "hi"}, {PadTo: 200_000}, {OmitABIExport: true}} {
		var buf bytes.Buffer
		n, err := WriteProxyWasm(&buf, opts)
		if err != nil || n != int64(buf.Len()) {
			t.Fatalf("%+v: WriteProxyWasm = %d, %v (wrote %d)", opts, n, err, buf.Len())
		}
		if !bytes.Equal(buf.Bytes(), ProxyWasm(opts)) {
			t.Errorf("%+v: WriteProxyWasm and ProxyWasm differ", opts)
		}
	}
	if !bytes.Equal(ProxyWasm(Options{}), ProxyWasm(Options{Message: DefaultMessage})) {
		t.Errorf("empty Message is not DefaultMessage")
	}
}

func TestBadFixtures(t *testing.T) {
	r := newRuntime(t, nil)

	t.Run("OmitABIExport", func(t *testing.T) {
		cm := compile(t, r, ProxyWasm(Options{OmitABIExport: true}))
		for name := range cm.ExportedFunctions() {
			if strings.HasPrefix(name, "proxy_abi_version_") {
				t.Errorf("has ABI export %s", name)
			}
		}
		if _, ok := cm.ExportedFunctions()["proxy_on_vm_start"]; !ok {
			t.Errorf("lost the other exports")
		}
	})

	t.Run("ExtraEnvImport", func(t *testing.T) {
		const extra = "not_a_proxy_wasm_function"
		mod := ProxyWasm(Options{ExtraEnvImport: extra})
		cm := compile(t, r, mod)
		var found bool
		for _, def := range cm.ImportedFunctions() {
			if m, n, _ := def.Import(); m == "env" && n == extra {
				found = len(def.ParamTypes()) == 0 && len(def.ResultTypes()) == 0
			}
		}
		if !found {
			t.Errorf("env.%s () -> () not among the imports", extra)
		}
		if _, ok := cm.ExportedFunctions()[ABIVersionExport]; !ok {
			t.Errorf("lost the ABI export")
		}
		// A host that provides only the real ABI cannot instantiate it.
		ctx := context.Background()
		r := newRuntime(t, nil)
		if _, err := r.NewHostModuleBuilder("env").NewFunctionBuilder().
			WithFunc(func(level, ptr, size uint32) uint32 { return 0 }).
			Export("proxy_log").Instantiate(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Instantiate(ctx, mod); err == nil {
			t.Errorf("instantiated despite the missing import")
		}
	})

	t.Run("OmitMemoryExport", func(t *testing.T) {
		cm := compile(t, r, ProxyWasm(Options{OmitMemoryExport: true}))
		if mems := cm.ExportedMemories(); len(mems) != 0 {
			t.Errorf("exported memories %v, want none", slices.Sorted(maps.Keys(mems)))
		}
		if _, ok := cm.ExportedFunctions()[ABIVersionExport]; !ok {
			t.Errorf("lost the ABI export")
		}
	})

	t.Run("Garbage", func(t *testing.T) {
		for _, n := range []int{0, 1, 4, 8, 100, 10_000} {
			g := Garbage(n)
			if len(g) != n {
				t.Errorf("Garbage(%d) has %d bytes", n, len(g))
			}
			if bytes.HasPrefix(g, []byte(wasmMagic)) {
				t.Errorf("Garbage(%d) starts with the Wasm magic", n)
			}
			if _, err := r.CompileModule(context.Background(), g); err == nil {
				t.Errorf("Garbage(%d) compiled", n)
			}
		}
	})

	t.Run("Truncated", func(t *testing.T) {
		full := ProxyWasm(Options{})
		tr := Truncated()
		if len(tr) >= len(full) || !bytes.HasPrefix(full, tr) {
			t.Errorf("Truncated (%d bytes) is not a proper prefix of the module (%d bytes)", len(tr), len(full))
		}
		if _, err := r.CompileModule(context.Background(), tr); err == nil {
			t.Errorf("Truncated compiled")
		}
	})
}

// TestCommittedPlugin keeps test/testdata/plugin.wasm in sync with the
// generator; rebuild it with `go run ./test/testdata/gen` from the repo root.
func TestCommittedPlugin(t *testing.T) {
	path := filepath.Join("..", "..", "testdata", "plugin.wasm")
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, ProxyWasm(Options{})) {
		t.Errorf("%s differs from ProxyWasm(Options{}); run `go run ./test/testdata/gen` from the repository root", path)
	}
}

func TestLEB128(t *testing.T) {
	for _, tc := range []struct {
		v    uint32
		want []byte
	}{
		{0, []byte{0x00}},
		{127, []byte{0x7F}},
		{128, []byte{0x80, 0x01}},
		{624485, []byte{0xE5, 0x8E, 0x26}},
		{0xFFFFFFFF, []byte{0xFF, 0xFF, 0xFF, 0xFF, 0x0F}},
	} {
		if got := appendU32(nil, tc.v); !bytes.Equal(got, tc.want) || u32Len(tc.v) != len(tc.want) {
			t.Errorf("appendU32(%d) = % x (len %d), want % x", tc.v, got, u32Len(tc.v), tc.want)
		}
	}
	if got := appendU32Width(nil, 127, 2); !bytes.Equal(got, []byte{0xFF, 0x00}) {
		t.Errorf("appendU32Width(127, 2) = % x", got)
	}
	for _, tc := range []struct {
		v    int32
		want []byte
	}{
		{0, []byte{0x00}},
		{63, []byte{0x3F}},
		{64, []byte{0xC0, 0x00}},
		{-1, []byte{0x7F}},
		{-8, []byte{0x78}},
		{-65, []byte{0xBF, 0x7F}},
		{-123456, []byte{0xC0, 0xBB, 0x78}},
	} {
		if got := appendS32(nil, tc.v); !bytes.Equal(got, tc.want) {
			t.Errorf("appendS32(%d) = % x, want % x", tc.v, got, tc.want)
		}
	}
}

func allI32(types []api.ValueType, n int) bool {
	if len(types) != n {
		return false
	}
	for _, vt := range types {
		if vt != api.ValueTypeI32 {
			return false
		}
	}
	return true
}

// TestSections: the sections of a generated module tile it after the
// header, and a cut module is an error.
func TestSections(t *testing.T) {
	mod := ProxyWasm(Options{})
	secs, err := Sections(mod)
	if err != nil {
		t.Fatal(err)
	}
	next := 8
	for _, s := range secs {
		if s.Start != next || s.Payload <= s.Start || s.End < s.Payload {
			t.Fatalf("section %+v does not follow at %d", s, next)
		}
		next = s.End
	}
	if next != len(mod) {
		t.Errorf("sections end at %d of %d bytes", next, len(mod))
	}
	if _, err := Sections(Truncated()); err == nil {
		t.Error("Sections of a truncated module: no error")
	}
}
