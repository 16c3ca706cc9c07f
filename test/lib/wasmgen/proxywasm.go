// Package wasmgen generates small, real proxy-wasm modules (and deliberately
// broken ones) for tests and benchmarks, without tinygo or a proxy-wasm SDK:
// the Wasm binary format is written directly by a tiny encoder (encode.go).
//
// The generated module targets the proxy-wasm ABI v0.2.1
// (https://github.com/proxy-wasm/spec/tree/main/abi-versions/v0.2.1). It
//
//   - imports env.proxy_log(level, ptr, len i32) -> i32;
//   - exports "memory", the marker proxy_abi_version_0_2_1, a bump allocator
//     as both proxy_on_memory_allocate and malloc, and the callbacks
//     proxy_on_vm_start, proxy_on_configure, proxy_on_context_create,
//     proxy_on_request_headers, proxy_on_response_headers, proxy_on_done,
//     proxy_on_log, proxy_on_delete and proxy_on_tick;
//   - logs Options.Message at info level from proxy_on_vm_start, which then
//     returns 1 (success). Header callbacks return 0 (Continue), and the
//     configure and done callbacks return 1 (true).
package wasmgen

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// DefaultMessage is what proxy_on_vm_start logs when Options.Message is empty.
const DefaultMessage = "wasm-csi sample module loaded"

// PadSectionName is the name of the custom section added by Options.PadTo.
const PadSectionName = "wasm-csi-pad"

// ABIVersionExport is the export that marks a module as proxy-wasm ABI 0.2.1.
const ABIVersionExport = "proxy_abi_version_0_2_1"

const (
	pageSize     = 65536
	msgOffset    = 16 // linear-memory address of the log message
	logLevelInfo = 2  // proxy_log_level_t INFO
)

// Options selects what ProxyWasm generates. The zero value is the default,
// valid module (the one committed as test/testdata/plugin.wasm).
type Options struct {
	// Message is logged by proxy_on_vm_start; DefaultMessage if empty.
	Message string

	// PadTo, if > 0, appends a custom section named PadSectionName so that
	// the module is exactly PadTo bytes long (e.g. 64 MiB for benchmarks).
	// The padding is deterministic pseudo-random bytes, so that it does not
	// compress away when stored in a compressed layer. It must leave room for
	// the unpadded module plus the section header (a few dozen bytes over
	// the default size is enough).
	PadTo int

	// OmitABIExport drops the proxy_abi_version_0_2_1 export (bad fixture:
	// a valid Wasm module that is not proxy-wasm).
	OmitABIExport bool

	// ExtraEnvImport, if set, adds an import env.<ExtraEnvImport> of type
	// () -> () (bad fixture: a host function Envoy does not provide, e.g.
	// "not_a_proxy_wasm_function").
	ExtraEnvImport string

	// OmitMemoryExport keeps the memory but does not export it (bad
	// fixture: the host cannot exchange data with the module).
	OmitMemoryExport bool

	// ABIExport, if set, is the name of the ABI marker export instead of
	// ABIVersionExport: e.g. "proxy_abi_version_0_1_0" for an older ABI, or
	// an unknown version for a bad fixture. OmitABIExport takes precedence.
	ABIExport string

	// Imports adds function imports after env.proxy_log and ExtraEnvImport,
	// in order (fixtures for import rules: WASI functions, other modules,
	// wrong signatures). They are declared but never called.
	Imports []Import

	// MinMemoryPages, if larger than the pages the module needs, is the
	// minimum size of its memory in 64 KiB pages (bad fixture: 65536 pages
	// asks for 4 GiB at instantiation).
	MinMemoryPages uint32

	// OmitAllocatorExports keeps the allocator but exports it neither as
	// malloc nor as proxy_on_memory_allocate (bad fixture: the host cannot
	// allocate guest memory).
	OmitAllocatorExports bool
}

// Import is a function import added by Options.Imports: Module.Name taking
// Params i32 parameters and returning Results i32 results.
type Import struct {
	Module, Name    string
	Params, Results int
}

// ProxyWasm returns the module described by opts. It panics if opts.PadTo is
// positive but too small (or too large) to be met exactly; use
// WriteProxyWasm to get an error instead.
func ProxyWasm(opts Options) []byte {
	var buf bytes.Buffer
	if opts.PadTo > 0 {
		buf.Grow(opts.PadTo)
	}
	if _, err := WriteProxyWasm(&buf, opts); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

// WriteProxyWasm writes the same bytes as ProxyWasm(opts) to w, streaming the
// padding in chunks so that huge modules are never held in memory. It returns
// the number of bytes written.
func WriteProxyWasm(w io.Writer, opts Options) (int64, error) {
	mod := build(opts).encode()
	if opts.PadTo <= 0 {
		n, err := w.Write(mod)
		return int64(n), err
	}
	hdr, fill, err := padHeader(len(mod), opts.PadTo)
	if err != nil {
		return 0, err
	}
	n, err := w.Write(append(mod, hdr...))
	total := int64(n)
	if err != nil {
		return total, err
	}
	m, err := writeFiller(w, fill)
	return total + m, err
}

// padHeader returns the start of the padding custom section (id, size, name)
// and the number of filler bytes that must follow it so that a module of
// modLen bytes grows to exactly padTo bytes.
func padHeader(modLen, padTo int) ([]byte, int64, error) {
	nameLen := u32Len(uint32(len(PadSectionName))) + len(PadSectionName)
	rest := int64(padTo) - int64(modLen) // bytes for the whole section
	// The section is 1 id byte + width bytes of payload size + payload. Use
	// the smallest width that can encode the payload size; when the exact
	// size falls just past a LEB128 length boundary no shortest-form width
	// fits, and the size is written with one padding byte instead.
	// At least one filler byte is always written: wazero (with custom
	// sections enabled) fails to decode an empty custom section at the end
	// of a module.
	for width := 1; width <= 5; width++ {
		payload := rest - 1 - int64(width)
		if payload <= int64(nameLen) || payload > math.MaxUint32 {
			continue
		}
		if u32Len(uint32(payload)) <= width {
			hdr := appendU32Width([]byte{secCustom}, uint32(payload), width)
			hdr = appendName(hdr, PadSectionName)
			return hdr, payload - int64(nameLen), nil
		}
	}
	minimum := modLen + 2 + nameLen + 1
	if rest < int64(minimum-modLen) {
		return nil, 0, fmt.Errorf("wasmgen: PadTo %d is too small: the module is %d bytes without padding and at least %d with it", padTo, modLen, minimum)
	}
	return nil, 0, fmt.Errorf("wasmgen: PadTo %d is too large for a Wasm custom section", padTo)
}

// writeFiller writes n deterministic pseudo-random bytes (splitmix64) to w.
func writeFiller(w io.Writer, n int64) (int64, error) {
	buf := make([]byte, 64<<10) // a multiple of 8
	var state uint64
	var written int64
	for written < n {
		for i := 0; i < len(buf); i += 8 {
			state += 0x9E3779B97F4A7C15
			z := state
			z = (z ^ z>>30) * 0xBF58476D1CE4E5B9
			z = (z ^ z>>27) * 0x94D049BB133111EB
			binary.LittleEndian.PutUint64(buf[i:], z^z>>31)
		}
		chunk := buf[:min(int64(len(buf)), n-written)]
		m, err := w.Write(chunk)
		written += int64(m)
		if err != nil {
			return written, err
		}
	}
	return written, nil
}

// build lays out the proxy-wasm module for opts.
func build(opts Options) *module {
	msg := opts.Message
	if msg == "" {
		msg = DefaultMessage
	}
	// The heap starts after the message, 16-byte aligned; the memory is
	// large enough to hold the message, and grows on demand in the allocator.
	heap := int32((msgOffset + len(msg) + 15) &^ 15)
	m := &module{
		memPages:   uint32((int(heap) + pageSize - 1) / pageSize),
		heapGlobal: &heap,
		data:       []dataSegment{{offset: msgOffset, bytes: []byte(msg)}},
	}
	m.memPages = max(m.memPages, opts.MinMemoryPages)
	if !opts.OmitMemoryExport {
		m.memExport = "memory"
	}

	proxyLog := m.importFunc("env", "proxy_log", 3, 1)
	if opts.ExtraEnvImport != "" {
		m.importFunc("env", opts.ExtraEnvImport, 0, 0)
	}
	for _, im := range opts.Imports {
		m.importFunc(im.Module, im.Name, im.Params, im.Results)
	}

	if !opts.OmitABIExport {
		abi := ABIVersionExport
		if opts.ABIExport != "" {
			abi = opts.ABIExport
		}
		m.addFunc(0, 0, 0, expr(), abi)
	}
	if opts.OmitAllocatorExports {
		m.addFunc(1, 1, 2, allocBody())
	} else {
		m.addFunc(1, 1, 2, allocBody(), "proxy_on_memory_allocate", "malloc")
	}
	// proxy_on_vm_start(root_context_id, vm_configuration_size) -> bool:
	// proxy_log(INFO, msg, len(msg)), ignore its status, return true.
	m.addFunc(2, 1, 0, expr(
		i32Const(logLevelInfo), i32Const(msgOffset), i32Const(int32(len(msg))),
		call(proxyLog), op(opDrop),
		i32Const(1),
	), "proxy_on_vm_start")
	// proxy_on_configure(root_context_id, plugin_configuration_size) -> bool
	m.addFunc(2, 1, 0, expr(i32Const(1)), "proxy_on_configure")
	// proxy_on_context_create(context_id, parent_context_id)
	m.addFunc(2, 0, 0, expr(), "proxy_on_context_create")
	// proxy_on_{request,response}_headers(context_id, num_headers,
	// end_of_stream) -> action; 0 is Continue.
	m.addFunc(3, 1, 0, expr(i32Const(0)), "proxy_on_request_headers")
	m.addFunc(3, 1, 0, expr(i32Const(0)), "proxy_on_response_headers")
	// proxy_on_done(context_id) -> bool
	m.addFunc(1, 1, 0, expr(i32Const(1)), "proxy_on_done")
	// proxy_on_log(context_id), proxy_on_delete(context_id),
	// proxy_on_tick(root_context_id)
	m.addFunc(1, 0, 0, expr(), "proxy_on_log")
	m.addFunc(1, 0, 0, expr(), "proxy_on_delete")
	m.addFunc(1, 0, 0, expr(), "proxy_on_tick")
	return m
}

// allocBody is a bump allocator over global 0, with parameter 0 = size and
// locals 1 = ptr, 2 = end. It returns 8-byte aligned pointers, grows the
// memory when needed, and returns 0 on failure. Memory is never freed.
//
//	ptr := heap
//	if size > 0x7FFFFFF0 { return 0 }
//	end := (ptr + size + 7) &^ 7
//	if end < ptr { return 0 }                      // wrapped around
//	if end > memory.size << 16 {
//	    if memory.grow(((end-1) >> 16) + 1 - memory.size) == -1 { return 0 }
//	}
//	heap = end
//	return ptr
func allocBody() []byte {
	const size, ptr, end = 0, 1, 2
	return expr(
		globalGet(0), localSet(ptr),

		localGet(size), i32Const(0x7FFFFFF0), op(opI32GtU),
		ifEmpty(), i32Const(0), op(opReturn), op(opEnd),

		localGet(ptr), localGet(size), op(opI32Add),
		i32Const(7), op(opI32Add), i32Const(-8), op(opI32And), localSet(end),

		localGet(end), localGet(ptr), op(opI32LtU),
		ifEmpty(), i32Const(0), op(opReturn), op(opEnd),

		localGet(end), memorySize(), i32Const(16), op(opI32Shl), op(opI32GtU),
		ifEmpty(),
		localGet(end), i32Const(1), op(opI32Sub), i32Const(16), op(opI32ShrU),
		i32Const(1), op(opI32Add), memorySize(), op(opI32Sub),
		memoryGrow(), i32Const(-1), op(opI32Eq),
		ifEmpty(), i32Const(0), op(opReturn), op(opEnd),
		op(opEnd),

		localGet(end), globalSet(0),
		localGet(ptr),
	)
}

// Garbage returns n bytes that are not a Wasm module: they never start with
// the Wasm magic (they are repeated ASCII text).
func Garbage(n int) []byte {
	const text = "wasm-csi: this is not a WebAssembly module\n"
	out := make([]byte, 0, max(n, 0))
	for len(out) < n {
		out = append(out, text[:min(len(text), n-len(out))]...)
	}
	return out
}

// Truncated returns the default module cut in the middle of its code
// section, so it starts like a valid module but cannot be decoded.
func Truncated() []byte {
	mod := ProxyWasm(Options{})
	start, size, err := findSection(mod, secCode)
	if err != nil {
		panic(err)
	}
	return bytes.Clone(mod[:start+size/2])
}

// findSection returns the payload offset and size of the first section with
// the given id.
func findSection(mod []byte, id byte) (start, size int, err error) {
	secs, err := Sections(mod)
	if err != nil {
		return 0, 0, err
	}
	for _, s := range secs {
		if s.ID == id {
			return s.Payload, s.End - s.Payload, nil
		}
	}
	return 0, 0, fmt.Errorf("wasmgen: no section %d", id)
}

// Section is where one section of a module lies: mod[Start] is its id,
// mod[Payload:End] its contents.
type Section struct {
	ID                  byte
	Start, Payload, End int
}

// Sections lists the sections of mod (a module with its 8-byte header), in
// order, for tests that cut or change a module where a section lies. A
// section size that is not a LEB128 u32 or runs past the end is an error.
func Sections(mod []byte) ([]Section, error) {
	var out []Section
	off := len(wasmMagic) + len(wasmVersion)
	for off < len(mod) {
		s := Section{ID: mod[off], Start: off}
		off++
		var v uint32
		var shift uint
		for {
			if off >= len(mod) || shift > 28 {
				return nil, errors.New("wasmgen: bad section size")
			}
			c := mod[off]
			off++
			v |= uint32(c&0x7F) << shift
			shift += 7
			if c&0x80 == 0 {
				break
			}
		}
		s.Payload, s.End = off, off+int(v)
		if s.End > len(mod) {
			return nil, fmt.Errorf("wasmgen: section %d at %d runs past the end", s.ID, s.Start)
		}
		out = append(out, s)
		off = s.End
	}
	return out, nil
}
