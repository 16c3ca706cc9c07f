// Package wasmcheck decides whether a stored module may be served: the Wasm
// header, decoding and validation as WebAssembly (wazero, interpreter only,
// never instantiated), and the proxy-wasm rules Envoy applies when it loads a
// module (ABI version export, allocator, the host functions Envoy provides,
// memory limits), kept here as data.
//
// It owns: the validation modes and reading a module file for them.
//
// It must not: write, rename or delete files (the store commits a module
// only after CheckFile accepts it), know the store's layout, or bound its
// own concurrency (its caller holds the validation slots).
package wasmcheck

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Mode is the config's validation setting.
type Mode string

// Validation modes, from the strictest (the default) to the loosest.
const (
	// ProxyWasm: everything Wasm checks, and the module must
	// be one Envoy will start (see CheckFile).
	ProxyWasm Mode = "proxy-wasm"
	// Wasm: the header, and the module decodes and validates as
	// WebAssembly.
	Wasm Mode = "wasm"
	// None: only the Wasm magic and version header.
	None Mode = "none"
)

// ParseMode parses the config's validation setting; "" is the
// default, ProxyWasm.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.TrimSpace(s)); m {
	case "":
		return ProxyWasm, nil
	case ProxyWasm, Wasm, None:
		return m, nil
	default:
		return "", fmt.Errorf("unknown validation mode %q: use %q (the default), %q or %q",
			s, ProxyWasm, Wasm, None)
	}
}

// envoyMaxMemoryPages is the most linear memory Envoy gives a Wasm module,
// in 64 KiB pages: PROXY_WASM_HOST_MAX_WASM_MEMORY_SIZE_BYTES (1 GiB) in
// proxy-wasm-cpp-host include/proxy-wasm/limits.h, which src/v8/v8.cc passes
// to V8 as --wasm_max_mem_pages. V8 refuses a module whose initial memory is
// larger; a larger maximum is only capped, and wazero does the same with
// this limit, so no module that declares a huge memory passes, and none
// allocates anything here either (compiling never instantiates a memory).
const envoyMaxMemoryPages = 16384

// validationConfig is a runtime config that compiles for the interpreter only: wazero decodes and
// validates the module (every function body included) and lowers it to
// interpreter code, but generates no machine code and never instantiates
// it. The features are wazero's CoreFeaturesV2 (WebAssembly 2.0), which
// Envoy's V8 supports and toolchains emit by default: mutable globals, bulk
// memory, sign extension, multi-value, reference types, non-trapping
// float-to-int and SIMD. V8 supports more (threads, tail calls, exception
// handling), but wazero cannot validate those with the features that
// matter here, so modules using them are refused; "validation: none" lets
// them through.
// DWARF and custom sections are not kept (readWasmSections drops custom
// sections anyway).
func validationConfig() wazero.RuntimeConfig {
	return wazero.NewRuntimeConfigInterpreter().
		WithCoreFeatures(api.CoreFeaturesV2).
		WithMemoryLimitPages(envoyMaxMemoryPages).
		WithDebugInfoEnabled(false).
		WithCustomSections(false)
}

// CheckFile checks the module file at path under mode. A refusal
// is a *errdefs.Error with Kind errdefs.ErrInvalidModule whose Msg says which rule broke and
// what to do (its Image is empty: the caller knows the image and sets it).
// A file that cannot be read is a *errdefs.Error with Kind errdefs.ErrInternal.
//
// The rules:
//   - every mode: the file starts with the Wasm magic and version 1
//     (\0asm 01 00 00 00);
//   - Wasm and ProxyWasm: the module decodes and validates
//     as WebAssembly with the features in validationConfig, and its initial
//     memory is at most Envoy's 1 GiB;
//   - ProxyWasm: as Envoy (proxy-wasm-cpp-host) loads a module, it
//     exports a proxy_abi_version_* function of an ABI version Envoy
//     implements (0_1_0, 0_2_0, 0_2_1; the first one in export order
//     decides, as in Envoy), exports its memory (or imports one), exports
//     malloc or proxy_on_memory_allocate typed (i32)->i32, imports no
//     global, and imports only functions Envoy registers for that ABI
//     version, with the same type (see envHostFunctions). Memory and table
//     imports are allowed: Envoy's V8 creates them.
//
// Memory: None reads the first 8 bytes only. The other modes need
// the module's bytes in memory, because wazero decodes only from a []byte
// (Runtime.CompileModule; it cannot read an io.Reader). Custom sections
// (DWARF debug info, producers, padding: often most of a module) are
// skipped on disk and never read, except the small "name" section, which
// Envoy parses too; the rest (types, code, data...) is read once into a
// buffer of its exact size. wazero then decodes it and lowers function
// bodies to interpreter code, about 40 times their size, so bodies are
// validated about chunkBytes at a time (compileModule): the peak is the
// buffer, wazero's decoded module and one chunk's interpreter code, plus GC
// slack (measured: 58 MiB of heap for a module of 13 MiB of code, 35 KiB for
// a small module padded to 64 MiB). All of it is garbage once this
// returns; the Service bounds how many validations run at once.
func CheckFile(path string, mode Mode) error {
	return checkFile(path, mode, chunkBytes)
}

// checkFile is CheckFile compiling about chunk bytes of
// function bodies at once (see compileModule).
func checkFile(path string, mode Mode, chunk int) error {
	mode, err := ParseMode(string(mode))
	if err != nil {
		return errdefs.New(errdefs.ErrInternal, "", err, "validate module")
	}
	f, err := os.Open(path)
	if err != nil {
		return errdefs.New(errdefs.ErrInternal, "", err, "open module for validation")
	}
	defer f.Close()
	if err := checkWasmHeader(f); err != nil {
		return err
	}
	if mode == None {
		return nil
	}

	code, err := readWasmSections(f)
	if err != nil {
		return err
	}
	// The module's own reading of its sections, before wazero's: a memory
	// over Envoy's limit is refused with its own message. When it cannot
	// be read, wazero says why below.
	mod, modErr := parseModule(code)
	if modErr == nil {
		if err := mod.checkMemory(); errors.Is(err, errMemoryOverLimit) {
			return refuse("asks for more memory than Envoy gives a module (%d pages, 1 GiB): %v: lower its initial memory",
				envoyMaxMemoryPages, err)
		}
	}
	ctx := context.Background()
	rt := wazero.NewRuntimeWithConfig(ctx, validationConfig())
	defer rt.Close(ctx)
	cm, err := compileModule(ctx, rt, code, chunk)
	if err != nil {
		return refuse("is not valid WebAssembly: %v: rebuild it, for WebAssembly 2.0 without threads, tail calls or exception handling, which this check does not accept (or have the operator set validation: none)", err)
	}
	defer cm.Close(ctx)
	if mode == Wasm {
		return nil
	}
	if modErr != nil {
		return refuse("is not valid WebAssembly: %v: rebuild it", modErr)
	}
	return checkProxyWasm(cm, mod)
}

// chunkBytes is about how many bytes of function bodies CheckFile
// has wazero compile at once (see compileModule). Measured on a module of
// 13 MiB of code: 256 KiB chunks peak at 58 MiB of heap in 1.1 s; 1 MiB
// chunks at 104 MiB in 0.9 s; the whole module at once at 500 MiB in 2.9 s.
const chunkBytes = 256 << 10

// stubBody is a code section entry valid for a function of any type: no
// locals, unreachable, end (unreachable makes the operand stack
// polymorphic, so end type-checks whatever the results).
var stubBody = []byte{0x03, 0x00, 0x00, 0x0B}

// compileModule decodes and validates code with wazero and returns a
// compiled module whose imports and exports (but not necessarily function
// bodies) are those of code.
//
// wazero validates only as part of CompileModule, and its interpreter then
// keeps every function lowered to interpreter code: about 40 times the size
// of the code section. So a large code section is validated in chunks of
// about chunk bytes (a function larger than that is a chunk of its own):
// each chunk is compiled as the whole module with the bodies outside the
// chunk replaced by stubBody, then closed. The result is the same as
// compiling the module at once, because a body's validity depends only on
// the rest of the module (types, imports, tables, memories, globals,
// element and data counts), never on other bodies, and every function keeps
// its index, so wazero's errors name the right one. The module returned is
// the skeleton with every body a stub, cheap to keep for the
// import and export checks.
func compileModule(ctx context.Context, rt wazero.Runtime, code []byte, chunk int) (wazero.CompiledModule, error) {
	l, ok := parseCodeLayout(code)
	if !ok || l.bodyBytes <= chunk {
		return rt.CompileModule(ctx, code)
	}
	for start := 0; start < len(l.entries); {
		end, n := start, 0
		for end < len(l.entries) && (end == start || n+l.entries[end].n <= chunk) {
			n += l.entries[end].n
			end++
		}
		cm, err := rt.CompileModule(ctx, l.build(code, start, end))
		if err != nil {
			return nil, err
		}
		if err := cm.Close(ctx); err != nil {
			return nil, err
		}
		start = end
	}
	return rt.CompileModule(ctx, l.build(code, 0, 0))
}

// codeLayout locates the code section of a module and its entries.
type codeLayout struct {
	secStart, secEnd int // the whole code section, id byte included
	entries          []struct{ off, n int }
	bodyBytes        int
}

// parseCodeLayout finds the code section of code and its entries; ok is
// false if there is none or it is malformed (then wazero reports it).
func parseCodeLayout(code []byte) (l codeLayout, ok bool) {
	secs, err := sectionsOf(code)
	if err != nil {
		return l, false
	}
	for _, sc := range secs {
		if sc.id != sectionCode {
			continue
		}
		start, end := sc.start, sc.end
		sec := sc.reader(code)
		count := sec.u32()
		if sec.err != nil || int(count) > end-sec.i {
			return l, false
		}
		l.entries = make([]struct{ off, n int }, count)
		for i := range l.entries {
			off := sec.i
			n := sec.u32()
			if sec.err != nil || int(n) > end-sec.i {
				return l, false
			}
			sec.i += int(n)
			l.entries[i] = struct{ off, n int }{off, sec.i - off}
			l.bodyBytes += sec.i - off
		}
		if sec.i != end {
			return l, false
		}
		l.secStart, l.secEnd = start, end
		return l, true
	}
	return l, false
}

// build returns code with the bodies of the functions outside [from, to)
// replaced by stubBody.
func (l codeLayout) build(code []byte, from, to int) []byte {
	payload := binary.AppendUvarint(nil, uint64(len(l.entries)))
	size := len(payload) + (len(l.entries)-(to-from))*len(stubBody)
	for _, e := range l.entries[from:to] {
		size += e.n
	}
	out := make([]byte, 0, l.secStart+binary.MaxVarintLen32+1+size+len(code)-l.secEnd)
	out = append(out, code[:l.secStart]...)
	out = append(out, 10)
	out = binary.AppendUvarint(out, uint64(size))
	out = append(out, payload...)
	for i, e := range l.entries {
		if i >= from && i < to {
			out = append(out, code[e.off:e.off+e.n]...)
		} else {
			out = append(out, stubBody...)
		}
	}
	return append(out, code[l.secEnd:]...)
}

// refuse returns a validation refusal; msg completes "module ...".
func refuse(format string, args ...any) *errdefs.Error {
	return errdefs.New(errdefs.ErrInvalidModule, "", nil, "module "+format, args...)
}

// HeaderSize is the length of the Wasm header: the magic and the version.
const HeaderSize = 8

// checkWasmHeader reads the first 8 bytes of f and checks they are the Wasm
// magic and version 1.
func checkWasmHeader(f *os.File) error {
	var h [HeaderSize]byte
	n, err := io.ReadFull(f, h[:])
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return refuse("is %d bytes long, too short for a WebAssembly module: the image must carry the compiled .wasm file", n)
	case err != nil:
		return errdefs.New(errdefs.ErrInternal, "", err, "read module for validation")
	case string(h[:4]) != "\x00asm":
		return refuse("does not start with the WebAssembly magic bytes (\\0asm): it is not a compiled .wasm file; push the module built by your proxy-wasm SDK")
	case binary.LittleEndian.Uint32(h[4:]) == 0x1000d:
		return refuse("is a WebAssembly component (binary version 0x1000d), but Envoy loads core modules (version 1) only: build a core module (e.g. target wasm32-wasip1, without the component step)")
	case string(h[4:]) != "\x01\x00\x00\x00":
		return refuse("has WebAssembly binary version %#x, but Envoy loads version 1 modules only: rebuild it with a toolchain that emits WebAssembly 1.0 modules",
			binary.LittleEndian.Uint32(h[4:]))
	}
	return nil
}

// span is a byte range of the module file.
type span struct{ off, n int64 }

// readWasmSections returns the module in f without its custom sections,
// except the "name" section: the header and all other sections, in order,
// byte for byte. It checks that every section lies within the file and that
// custom section names are well-formed, as decoding the whole file would.
// f is positioned after the header.
func readWasmSections(f *os.File) ([]byte, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, errdefs.New(errdefs.ErrInternal, "", err, "read module for validation")
	}
	keep := []span{{0, HeaderSize}}
	err = walkSections(f, fi.Size(), func(s *sectionScanner, id byte, start, _, end int64) error {
		if id == sectionCustom {
			isName, err := s.readCustomName(end)
			if err != nil {
				return s.malformed(start, err)
			}
			if !isName {
				return nil
			}
		}
		if last := &keep[len(keep)-1]; last.off+last.n == start {
			last.n += end - start
		} else {
			keep = append(keep, span{start, end - start})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}

	var total int64
	for _, sp := range keep {
		total += sp.n
	}
	code := make([]byte, total)
	pos := int64(0)
	for _, sp := range keep {
		if _, err := f.ReadAt(code[pos:pos+sp.n], sp.off); err != nil {
			return nil, errdefs.New(errdefs.ErrInternal, "", err, "read module for validation")
		}
		pos += sp.n
	}
	return code, nil
}

// Section ids (https://webassembly.github.io/spec/core/binary/modules.html#sections).
const (
	sectionCustom = 0
	sectionImport = 2
	sectionMemory = 5
	sectionExport = 7
	sectionCode   = 10
)

// walkSections is the one reader of a module's sections, on disk or in
// memory: it calls visit for each section of the module in r (size bytes,
// after the header) in order, with its id and the offsets of its id byte,
// its contents and its end. It reads the section headers through a small
// buffer and seeks over the contents, which visit may read through s. A
// header that is malformed or a section that runs past the end is a
// refusal; an error of visit stops the walk and is returned.
func walkSections(r io.ReaderAt, size int64, visit func(s *sectionScanner, id byte, start, body, end int64) error) error {
	s := &sectionScanner{r: r, size: size}
	s.seek(HeaderSize)
	for s.off < s.size {
		start := s.off
		id, err := s.ReadByte()
		if err != nil {
			return s.readError(err)
		}
		n, err := readU32(s)
		if err != nil {
			return s.malformed(start, err)
		}
		end := s.off + int64(n)
		if end > s.size {
			return refuse("is truncated: its section at offset %d claims %d bytes, but the file ends %d bytes later: push the complete module",
				start, n, s.size-s.off)
		}
		if err := visit(s, id, start, s.off, end); err != nil {
			return err
		}
		s.seek(end)
	}
	return nil
}

// sectionSpan is one section of a module in memory: code[body:end] are its
// contents, code[start] its id.
type sectionSpan struct {
	id               byte
	start, body, end int
}

// reader reads the section's contents.
func (sc sectionSpan) reader(code []byte) *byteReader {
	return &byteReader{b: code[:sc.end], i: sc.body}
}

// sectionsOf lists the sections of code, a module in memory (through
// walkSections).
func sectionsOf(code []byte) ([]sectionSpan, error) {
	var out []sectionSpan
	err := walkSections(bytes.NewReader(code), int64(len(code)), func(_ *sectionScanner, id byte, start, body, end int64) error {
		out = append(out, sectionSpan{id: id, start: int(start), body: int(body), end: int(end)})
		return nil
	})
	return out, err
}

// sectionScanner reads section headers through a small buffer and seeks
// over section contents.
type sectionScanner struct {
	r    io.ReaderAt
	size int64
	off  int64 // offset of the next byte br returns
	br   *bufio.Reader
}

// seek moves to file offset off (not before the current offset).
func (s *sectionScanner) seek(off int64) {
	if s.br != nil && off-s.off <= int64(s.br.Buffered()) {
		s.br.Discard(int(off - s.off))
		s.off = off
		return
	}
	s.off = off
	r := io.NewSectionReader(s.r, off, s.size-off)
	if s.br == nil {
		s.br = bufio.NewReaderSize(r, 4096)
	} else {
		s.br.Reset(r)
	}
}

// ReadByte makes s an io.ByteReader, for readU32.
func (s *sectionScanner) ReadByte() (byte, error) {
	b, err := s.br.ReadByte()
	if err == nil {
		s.off++
	}
	return b, err
}

var (
	errBadLEB  = errors.New("malformed LEB128 integer")
	errBadName = errors.New("malformed custom section name")
)

// readU32 is the one LEB128 reader: it reads an unsigned LEB128 u32 from
// r, at most 5 bytes, the 5th holding the top 4 bits. (encoding/binary's
// ReadUvarint reads up to 64 bits in 10 bytes; Wasm's u32 is narrower.)
func readU32(r io.ByteReader) (uint32, error) {
	var v uint32
	for i := range 5 {
		b, err := r.ReadByte()
		if err != nil {
			return 0, err
		}
		if i == 4 && b&0xF0 != 0 { // continuation bit, or bits past 32
			return 0, errBadLEB
		}
		v |= uint32(b&0x7F) << (7 * i)
		if b&0x80 == 0 {
			return v, nil
		}
	}
	return 0, errBadLEB
}

// readCustomName reads the name of a custom section ending at end, checks
// that it is UTF-8 within the section, and reports whether it is "name".
// Names are read in chunks: a name may be as long as the file.
func (s *sectionScanner) readCustomName(end int64) (bool, error) {
	n, err := readU32(s)
	if err != nil {
		return false, err
	}
	if int64(n) > end-s.off {
		return false, fmt.Errorf("%w: longer than the section", errBadName)
	}
	var buf [4096]byte
	carry, isName := 0, n == 4
	for left := int64(n); left > 0; {
		k := min(left, int64(len(buf)-carry))
		if _, err := io.ReadFull(s.br, buf[carry:carry+int(k)]); err != nil {
			return false, err
		}
		s.off += k
		left -= k
		data := buf[:carry+int(k)]
		if isName {
			isName = string(data) == "name"
		}
		// Keep an incomplete last rune for the next chunk.
		cut := len(data)
		if left > 0 {
			i := len(data) - 1
			for j := 0; j < 3 && i > 0 && !utf8.RuneStart(data[i]); j++ {
				i--
			}
			if !utf8.FullRune(data[i:]) {
				cut = i
			}
		}
		if !utf8.Valid(data[:cut]) {
			return false, fmt.Errorf("%w: not UTF-8", errBadName)
		}
		carry = copy(buf[:], data[cut:])
	}
	return isName, nil
}

// malformed turns an error reading the header of the section at offset
// start into a refusal, or an internal error if the file could not be read.
func (s *sectionScanner) malformed(start int64, err error) error {
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return refuse("is truncated: its section at offset %d is cut short: push the complete module", start)
	case errors.Is(err, errBadLEB) || errors.Is(err, errBadName):
		return refuse("is not valid WebAssembly: section at offset %d: %v: rebuild it, or push the complete module", start, err)
	}
	return s.readError(err)
}

func (s *sectionScanner) readError(err error) error {
	return errdefs.New(errdefs.ErrInternal, "", err, "read module for validation")
}

// The host functions Envoy links into a Wasm module, with their types
// written (params)->results ("()" for none), as read in:
//
//   - proxy-wasm/proxy-wasm-cpp-host at 52a02917b301c679ff43565064cffd2c3c750f6d
//     (2026-07-01): WasmBase::registerCallbacks in src/wasm.cc registers,
//     in module "env", pthread_equal, emscripten_notify_memory_growth, every
//     FOR_ALL_HOST_FUNCTIONS name with the prefix "proxy_", and the ABI
//     specific ones below; and every FOR_ALL_WASI_FUNCTIONS name in both
//     "wasi_unstable" and "wasi_snapshot_preview1" (the macros are in
//     include/proxy-wasm/exports.h). Types are those of the C++ functions in
//     exports.h: Word is i32, int64_t and uint64_t are i64
//     (include/proxy-wasm/word.h, ConvertFunctionWordToUint32). Functions a
//     plugin's capabilities restrict are replaced by stubs of the same
//     type, so they still link.
//   - envoyproxy/envoy at 5fbb163d9688f1b11437ff976c26e474c22ab8d2:
//     Wasm::registerCallbacks in source/extensions/common/wasm/wasm.cc adds
//     env.envoy_resolve_dns.
//
// Envoy links function imports by "module.name" (V8::link in src/v8/v8.cc):
// a function import not registered, from any module, or of another type,
// fails with "Failed to load Wasm module due to a missing import" (or "an
// import type mismatch"), and so does any global import. Older Envoy
// releases register fewer WASI functions (most were added in
// proxy-wasm-cpp-host #427 and #533, 2024-2026), so a module passing here
// may still need a recent Envoy.
var (
	// envHostFunctions are the env functions of every ABI version.
	envHostFunctions = map[string]string{
		"pthread_equal":                   "(i32,i32)->i32",
		"emscripten_notify_memory_growth": "(i32)->()",
		"envoy_resolve_dns":               "(i32,i32,i32)->i32",
		// FOR_ALL_HOST_FUNCTIONS
		"proxy_log":                          "(i32,i32,i32)->i32",
		"proxy_get_status":                   "(i32,i32,i32)->i32",
		"proxy_set_property":                 "(i32,i32,i32,i32)->i32",
		"proxy_get_property":                 "(i32,i32,i32,i32)->i32",
		"proxy_send_local_response":          "(i32,i32,i32,i32,i32,i32,i32,i32)->i32",
		"proxy_get_shared_data":              "(i32,i32,i32,i32,i32)->i32",
		"proxy_set_shared_data":              "(i32,i32,i32,i32,i32)->i32",
		"proxy_register_shared_queue":        "(i32,i32,i32)->i32",
		"proxy_resolve_shared_queue":         "(i32,i32,i32,i32,i32)->i32",
		"proxy_dequeue_shared_queue":         "(i32,i32,i32)->i32",
		"proxy_enqueue_shared_queue":         "(i32,i32,i32)->i32",
		"proxy_get_header_map_value":         "(i32,i32,i32,i32,i32)->i32",
		"proxy_add_header_map_value":         "(i32,i32,i32,i32,i32)->i32",
		"proxy_replace_header_map_value":     "(i32,i32,i32,i32,i32)->i32",
		"proxy_remove_header_map_value":      "(i32,i32,i32)->i32",
		"proxy_get_header_map_pairs":         "(i32,i32,i32)->i32",
		"proxy_set_header_map_pairs":         "(i32,i32,i32)->i32",
		"proxy_get_header_map_size":          "(i32,i32)->i32",
		"proxy_get_buffer_status":            "(i32,i32,i32)->i32",
		"proxy_get_buffer_bytes":             "(i32,i32,i32,i32,i32)->i32",
		"proxy_set_buffer_bytes":             "(i32,i32,i32,i32,i32)->i32",
		"proxy_http_call":                    "(i32,i32,i32,i32,i32,i32,i32,i32,i32,i32)->i32",
		"proxy_grpc_call":                    "(i32,i32,i32,i32,i32,i32,i32,i32,i32,i32,i32,i32)->i32",
		"proxy_grpc_stream":                  "(i32,i32,i32,i32,i32,i32,i32,i32,i32)->i32",
		"proxy_grpc_close":                   "(i32)->i32",
		"proxy_grpc_cancel":                  "(i32)->i32",
		"proxy_grpc_send":                    "(i32,i32,i32,i32)->i32",
		"proxy_set_tick_period_milliseconds": "(i32)->i32",
		"proxy_get_current_time_nanoseconds": "(i32)->i32",
		"proxy_define_metric":                "(i32,i32,i32,i32)->i32",
		"proxy_increment_metric":             "(i32,i64)->i32",
		"proxy_record_metric":                "(i32,i64)->i32",
		"proxy_get_metric":                   "(i32,i32)->i32",
		"proxy_set_effective_context":        "(i32)->i32",
		"proxy_done":                         "()->i32",
		"proxy_call_foreign_function":        "(i32,i32,i32,i32,i32,i32)->i32",
	}

	// abiHostFunctions are the env functions Envoy registers only for a
	// module exporting that ABI version marker.
	abiHostFunctions = map[string]map[string]string{
		"proxy_abi_version_0_1_0": {
			"proxy_get_configuration": "(i32,i32)->i32",
			"proxy_continue_request":  "()->i32",
			"proxy_continue_response": "()->i32",
			"proxy_clear_route_cache": "()->i32",
		},
		"proxy_abi_version_0_2_0": {
			"proxy_continue_stream": "(i32)->i32",
			"proxy_close_stream":    "(i32)->i32",
		},
		"proxy_abi_version_0_2_1": {
			"proxy_continue_stream": "(i32)->i32",
			"proxy_close_stream":    "(i32)->i32",
			"proxy_get_log_level":   "(i32)->i32",
		},
	}

	// wasiHostFunctions (FOR_ALL_WASI_FUNCTIONS) are registered in both
	// wasiModules. Their types are WASI's, except path_link and
	// path_symlink, which Envoy declares with fewer parameters than WASI
	// does (so a module importing them with WASI's types fails to link).
	wasiHostFunctions = map[string]string{
		"fd_write":                "(i32,i32,i32,i32)->i32",
		"fd_read":                 "(i32,i32,i32,i32)->i32",
		"fd_seek":                 "(i32,i64,i32,i32)->i32",
		"fd_close":                "(i32)->i32",
		"fd_fdstat_get":           "(i32,i32)->i32",
		"fd_fdstat_set_flags":     "(i32,i32)->i32",
		"fd_fdstat_set_rights":    "(i32,i64,i64)->i32",
		"environ_get":             "(i32,i32)->i32",
		"environ_sizes_get":       "(i32,i32)->i32",
		"args_get":                "(i32,i32)->i32",
		"args_sizes_get":          "(i32,i32)->i32",
		"clock_time_get":          "(i32,i64,i32)->i32",
		"clock_res_get":           "(i32,i32)->i32",
		"fd_advise":               "(i32,i64,i64,i32)->i32",
		"fd_allocate":             "(i32,i64,i64)->i32",
		"fd_datasync":             "(i32)->i32",
		"fd_filestat_set_size":    "(i32,i64)->i32",
		"fd_filestat_set_times":   "(i32,i64,i64,i32)->i32",
		"fd_pread":                "(i32,i32,i32,i64,i32)->i32",
		"fd_pwrite":               "(i32,i32,i32,i64,i32)->i32",
		"fd_readdir":              "(i32,i32,i32,i64,i32)->i32",
		"fd_renumber":             "(i32,i32)->i32",
		"fd_sync":                 "(i32)->i32",
		"fd_tell":                 "(i32,i32)->i32",
		"path_create_directory":   "(i32,i32,i32)->i32",
		"path_filestat_set_times": "(i32,i32,i32,i32,i64,i64,i32)->i32",
		"path_link":               "(i32,i32,i32,i32,i32,i32)->i32", // sic: WASI has 7 params
		"path_readlink":           "(i32,i32,i32,i32,i32,i32)->i32",
		"path_remove_directory":   "(i32,i32,i32)->i32",
		"path_rename":             "(i32,i32,i32,i32,i32,i32)->i32",
		"path_symlink":            "(i32,i32,i32,i32)->i32", // sic: WASI has 5 params
		"path_unlink_file":        "(i32,i32,i32)->i32",
		"sock_accept":             "(i32,i32,i32)->i32",
		"sock_recv":               "(i32,i32,i32,i32,i32,i32)->i32",
		"sock_send":               "(i32,i32,i32,i32,i32)->i32",
		"sock_shutdown":           "(i32,i32)->i32",
		"random_get":              "(i32,i32)->i32",
		"sched_yield":             "()->i32",
		"poll_oneoff":             "(i32,i32,i32,i32)->i32",
		"proc_exit":               "(i32)->()",
		"path_open":               "(i32,i32,i32,i32,i32,i64,i64,i32,i32)->i32",
		"fd_prestat_get":          "(i32,i32)->i32",
		"fd_prestat_dir_name":     "(i32,i32,i32)->i32",
		"path_filestat_get":       "(i32,i32,i32,i32,i32)->i32",
		"fd_filestat_get":         "(i32,i32)->i32",
	}

	wasiModules = []string{"wasi_snapshot_preview1", "wasi_unstable"}
)

// abiVersions are the ABI markers Envoy knows, in the order it tests them.
var abiVersions = []string{"proxy_abi_version_0_1_0", "proxy_abi_version_0_2_0", "proxy_abi_version_0_2_1"}

const abiPrefix = "proxy_abi_version_"

// allocatorType is the type Envoy calls malloc / proxy_on_memory_allocate with.
const allocatorType = "(i32)->i32"

// maxProblems is how many broken rules a refusal lists.
const maxProblems = 5

// checkProxyWasm applies the proxy-wasm rules to a module wazero compiled,
// mod being what parseModule read of it.
func checkProxyWasm(cm wazero.CompiledModule, mod module) error {
	imports, exports := mod.imports, mod.exports
	var problems []string
	add := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

	// ABI version: the first function export Envoy knows decides
	// (BytecodeUtil::getAbiVersion, src/bytecode_util.cc).
	abi, unknownABI := "", ""
	for _, e := range exports {
		if e.kind != externFunc {
			continue
		}
		if slices.Contains(abiVersions, e.name) {
			abi = e.name
			break
		}
		if unknownABI == "" && strings.HasPrefix(e.name, abiPrefix) {
			unknownABI = e.name
		}
	}
	switch {
	case abi != "":
	case unknownABI != "":
		add("exports %s, an ABI version Envoy does not implement (it implements %s): build it with a proxy-wasm SDK release that targets one of those",
			unknownABI, strings.Join(abiVersions, ", "))
	default:
		add("does not export a %s* function: build it with a proxy-wasm SDK", abiPrefix)
	}

	// Memory: V8 takes the memory the module exports, whatever its name, or
	// the one it imports.
	if len(cm.ExportedMemories()) == 0 && len(cm.ImportedMemories()) == 0 {
		add("does not export its memory, through which Envoy exchanges data with it: build it with a proxy-wasm SDK (the export is named \"memory\")")
	}

	// Allocator (WasmBase::getFunctions, src/wasm.cc): malloc, else
	// proxy_on_memory_allocate; a wrong type fails the module.
	funcs := cm.ExportedFunctions()
	if def, ok := funcs["malloc"]; ok {
		if t := funcType(def); t != allocatorType {
			add("exports malloc with type %s, but Envoy calls malloc as %s: rename that export, or give it that type", t, allocatorType)
		}
	} else if def, ok := funcs["proxy_on_memory_allocate"]; ok {
		if t := funcType(def); t != allocatorType {
			add("exports proxy_on_memory_allocate with type %s, but Envoy calls it as %s: build it with a proxy-wasm SDK", t, allocatorType)
		}
	} else {
		add("exports neither malloc nor proxy_on_memory_allocate, which Envoy calls to allocate memory in the module: build it with a proxy-wasm SDK")
	}

	// Imports.
	for _, im := range imports {
		if im.kind == externGlobal {
			add("imports the global %s.%s, and Envoy links no imported globals: build a standalone module (not one for dynamic linking)", im.module, im.name)
		}
	}
	for _, def := range cm.ImportedFunctions() {
		mod, name, _ := def.Import()
		if p := checkImport(abi, mod, name, funcType(def)); p != "" {
			add("%s", p)
		}
	}

	if len(problems) == 0 {
		return nil
	}
	msg := "module " + strings.Join(problems[:min(len(problems), maxProblems)], "; module ")
	if n := len(problems) - maxProblems; n > 0 {
		msg += fmt.Sprintf("; and %d more problems", n)
	}
	return errdefs.New(errdefs.ErrInvalidModule, "", nil, "%s", msg)
}

// checkImport checks one function import against what Envoy registers for
// ABI version abi ("" when unknown: then any version's functions count)
// and returns the problem, if any.
func checkImport(abi, mod, name, typ string) string {
	qual := mod + "." + name
	var want string
	var ok bool
	switch {
	case mod == "env":
		want, ok = envHostFunctions[name]
		if !ok && abi != "" {
			want, ok = abiHostFunctions[abi][name]
		}
		var versions []string // the ABI versions that have it
		for _, v := range abiVersions {
			if t, found := abiHostFunctions[v][name]; found {
				versions = append(versions, v)
				if !ok && abi == "" {
					// The ABI is unknown, and that is reported already:
					// accept any version's function, with its type.
					want = t
				}
			}
		}
		ok = ok || abi == "" && len(versions) > 0
		switch {
		case ok:
		case len(versions) > 0:
			return fmt.Sprintf("imports %s, which Envoy provides only to modules exporting %s, and this one exports %s: build it with a single proxy-wasm SDK release",
				qual, strings.Join(versions, " or "), abi)
		default:
			return fmt.Sprintf("imports %s, which Envoy does not provide (Envoy refuses to start a module with an unknown import): build it with a proxy-wasm SDK, and call only the host functions of the proxy-wasm ABI", qual)
		}
	case slices.Contains(wasiModules, mod):
		if want, ok = wasiHostFunctions[name]; !ok {
			return fmt.Sprintf("imports %s, a WASI function Envoy does not provide (it implements a subset of WASI): build it without that call", qual)
		}
	default:
		return fmt.Sprintf("imports %s, but Envoy links imports only from the modules env, wasi_snapshot_preview1 and wasi_unstable: remove the dependency on module %q (an unresolved import left by the toolchain?)", qual, mod)
	}
	if typ != want {
		return fmt.Sprintf("imports %s with type %s, but Envoy's %s has type %s: build it with a proxy-wasm SDK that matches Envoy", qual, typ, qual, want)
	}
	return ""
}

// funcType formats a function's type as (params)->results, the notation of
// the host function tables.
func funcType(def api.FunctionDefinition) string {
	names := func(ts []api.ValueType) []string {
		out := make([]string, len(ts))
		for i, t := range ts {
			out[i] = api.ValueTypeName(t)
		}
		return out
	}
	res := names(def.ResultTypes())
	r := strings.Join(res, ",")
	if len(res) != 1 {
		r = "(" + r + ")"
	}
	return "(" + strings.Join(names(def.ParamTypes()), ",") + ")->" + r
}

// External kinds of imports and exports.
const (
	externFunc   = 0
	externTable  = 1
	externMemory = 2
	externGlobal = 3
)

type wasmImport struct {
	module, name string
	kind         byte
	minPages     uint32 // of a memory
}

type wasmExport struct {
	name string
	kind byte
}

// module is what parseModule reads of a module.
type module struct {
	imports []wasmImport
	exports []wasmExport
	// memories are the initial sizes, in pages, of the memories it defines.
	memories []uint32
}

// errMemoryOverLimit: a memory starts larger than Envoy gives a module.
var errMemoryOverLimit = errors.New("over Envoy's memory limit")

// checkMemory returns an error wrapping errMemoryOverLimit if a memory the
// module defines or imports starts larger than envoyMaxMemoryPages (V8
// refuses it; a larger maximum is only capped, by wazero too).
func (m module) checkMemory() error {
	for i, pages := range m.memories {
		if pages > envoyMaxMemoryPages {
			return fmt.Errorf("memory %d starts at %d pages: %w of %d pages", i, pages, errMemoryOverLimit, envoyMaxMemoryPages)
		}
	}
	for _, im := range m.imports {
		if im.kind == externMemory && im.minPages > envoyMaxMemoryPages {
			return fmt.Errorf("imported memory %s.%s starts at %d pages: %w of %d pages", im.module, im.name, im.minPages, errMemoryOverLimit, envoyMaxMemoryPages)
		}
	}
	return nil
}

// parseModule returns the imports and the exports of a module in their
// order in the binary (wazero gives exports as a map, but Envoy's choice of
// ABI depends on their order, and wazero does not list imported globals),
// and its memories' initial sizes (wazero refuses a memory over the limit
// with only a message).
func parseModule(code []byte) (module, error) {
	var m module
	secs, err := sectionsOf(code)
	if err != nil {
		return m, errors.New("malformed section")
	}
	for _, sc := range secs {
		id, sec := sc.id, sc.reader(code)
		switch id {
		case sectionImport:
			for n := sec.u32(); n > 0 && sec.err == nil; n-- {
				im := wasmImport{module: sec.name(), name: sec.name(), kind: sec.byte()}
				switch im.kind {
				case externFunc:
					sec.u32()
				case externTable:
					sec.byte()
					sec.limits()
				case externMemory:
					im.minPages = sec.limits()
				case externGlobal:
					sec.byte()
					sec.byte()
				default:
					return m, fmt.Errorf("import %s.%s of unknown kind %d", im.module, im.name, im.kind)
				}
				m.imports = append(m.imports, im)
			}
		case sectionMemory:
			for n := sec.u32(); n > 0 && sec.err == nil; n-- {
				m.memories = append(m.memories, sec.limits())
			}
		case sectionExport:
			for n := sec.u32(); n > 0 && sec.err == nil; n-- {
				e := wasmExport{name: sec.name(), kind: sec.byte()}
				sec.u32()
				m.exports = append(m.exports, e)
			}
		}
		if sec.err != nil {
			return m, fmt.Errorf("section %d: %w", id, sec.err)
		}
	}
	return m, nil
}

// byteReader reads Wasm binary values from b; the first error sticks.
type byteReader struct {
	b   []byte
	i   int
	err error
}

var errShort = errors.New("unexpected end of section")

// ReadByte makes r an io.ByteReader, for readU32.
func (r *byteReader) ReadByte() (byte, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.i >= len(r.b) {
		r.err = errShort
		return 0, r.err
	}
	r.i++
	return r.b[r.i-1], nil
}

func (r *byteReader) byte() byte {
	b, _ := r.ReadByte()
	return b
}

func (r *byteReader) u32() uint32 {
	v, err := readU32(r)
	if err != nil {
		r.err = err
		return 0
	}
	return v
}

func (r *byteReader) name() string {
	n := r.u32()
	if r.err != nil {
		return ""
	}
	if int(n) > len(r.b)-r.i {
		r.err = errShort
		return ""
	}
	r.i += int(n)
	return string(r.b[r.i-int(n) : r.i])
}

// limits reads a table's or a memory's limits and returns the minimum.
func (r *byteReader) limits() (minimum uint32) {
	flags := r.byte()
	minimum = r.u32()
	if flags&1 != 0 {
		r.u32() // max
	}
	return minimum
}
