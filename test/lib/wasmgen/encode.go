package wasmgen

// This file holds a deliberately tiny encoder for the WebAssembly 1.0 binary
// format (https://webassembly.github.io/spec/core/binary/): LEB128 integers,
// names, sections, and a module builder that covers exactly what ProxyWasm
// needs (function types, function imports, one memory, one mutable i32
// global, function exports, a memory export and active data segments).

// Preamble of every Wasm 1.0 binary: the magic "\0asm" and version 1.
const (
	wasmMagic   = "\x00asm"
	wasmVersion = "\x01\x00\x00\x00"
)

// Section ids, in the order in which they must appear (custom sections may
// appear anywhere).
const (
	secCustom   byte = 0
	secType     byte = 1
	secImport   byte = 2
	secFunction byte = 3
	secMemory   byte = 5
	secGlobal   byte = 6
	secExport   byte = 7
	secCode     byte = 10
	secData     byte = 11
)

// Value types and other type constructors.
const (
	i32        byte = 0x7F
	funcTypeID byte = 0x60
	blockEmpty byte = 0x40 // block type of a block that yields no value
)

// Import and export descriptor kinds.
const (
	kindFunc   byte = 0x00
	kindMemory byte = 0x02
)

// Opcodes used by the generated function bodies.
const (
	opIf         byte = 0x04
	opEnd        byte = 0x0B
	opReturn     byte = 0x0F
	opCall       byte = 0x10
	opDrop       byte = 0x1A
	opLocalGet   byte = 0x20
	opLocalSet   byte = 0x21
	opGlobalGet  byte = 0x23
	opGlobalSet  byte = 0x24
	opMemorySize byte = 0x3F
	opMemoryGrow byte = 0x40
	opI32Const   byte = 0x41
	opI32Eq      byte = 0x46
	opI32LtU     byte = 0x49
	opI32GtU     byte = 0x4B
	opI32Add     byte = 0x6A
	opI32Sub     byte = 0x6B
	opI32And     byte = 0x71
	opI32Shl     byte = 0x74
	opI32ShrU    byte = 0x76
)

// appendU32 appends v as unsigned LEB128 in its shortest form.
func appendU32(b []byte, v uint32) []byte {
	for {
		c := byte(v & 0x7F)
		v >>= 7
		if v == 0 {
			return append(b, c)
		}
		b = append(b, c|0x80)
	}
}

// appendU32Width appends v as unsigned LEB128 using exactly width bytes
// (1 to 5). Padded encodings such as 0x80 0x00 for 0 are valid in Wasm as
// long as they do not exceed 5 bytes for a u32; ProxyWasm uses one only when
// no shortest-form length can hit an exact PadTo size.
func appendU32Width(b []byte, v uint32, width int) []byte {
	for i := 1; i < width; i++ {
		b = append(b, byte(v&0x7F)|0x80)
		v >>= 7
	}
	return append(b, byte(v&0x7F))
}

// u32Len is the length of the shortest LEB128 encoding of v.
func u32Len(v uint32) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

// appendS32 appends v as signed LEB128 (used by i32.const).
func appendS32(b []byte, v int32) []byte {
	for {
		c := byte(v & 0x7F)
		v >>= 7
		if (v == 0 && c&0x40 == 0) || (v == -1 && c&0x40 != 0) {
			return append(b, c)
		}
		b = append(b, c|0x80)
	}
}

// appendName appends a Wasm name: its byte length then its UTF-8 bytes.
func appendName(b []byte, s string) []byte {
	return append(appendU32(b, uint32(len(s))), s...)
}

// appendSection appends a section: its id, payload size, then the payload.
func appendSection(b []byte, id byte, payload []byte) []byte {
	b = append(b, id)
	b = appendU32(b, uint32(len(payload)))
	return append(b, payload...)
}

// Instruction helpers returning encoded instructions, so function bodies read
// like a flat listing of the instruction sequence.

func i32Const(v int32) []byte   { return appendS32([]byte{opI32Const}, v) }
func localGet(i uint32) []byte  { return appendU32([]byte{opLocalGet}, i) }
func localSet(i uint32) []byte  { return appendU32([]byte{opLocalSet}, i) }
func globalGet(i uint32) []byte { return appendU32([]byte{opGlobalGet}, i) }
func globalSet(i uint32) []byte { return appendU32([]byte{opGlobalSet}, i) }
func call(f uint32) []byte      { return appendU32([]byte{opCall}, f) }
func ifEmpty() []byte           { return []byte{opIf, blockEmpty} }
func memorySize() []byte        { return []byte{opMemorySize, 0x00} }
func memoryGrow() []byte        { return []byte{opMemoryGrow, 0x00} }
func op(o byte) []byte          { return []byte{o} }
func expr(ins ...[]byte) []byte { return append(concat(ins...), opEnd) }
func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// funcType is a function signature. All ProxyWasm signatures use only i32,
// so a type is just its parameter and result counts.
type funcType struct{ params, results int }

// function is a function defined by the module.
type function struct {
	typeIdx uint32
	locals  int    // number of extra i32 locals after the parameters
	body    []byte // instructions, including the final end
	exports []string
}

type funcImport struct {
	module, name string
	typeIdx      uint32
}

type dataSegment struct {
	offset int32
	bytes  []byte
}

// module collects the parts of a module and encodes them in section order.
type module struct {
	types      []funcType
	imports    []funcImport
	funcs      []function
	memPages   uint32 // minimum pages of the single memory
	memExport  string // export name of the memory; empty for none
	heapGlobal *int32 // initial value of the single mutable i32 global, if any
	data       []dataSegment
}

// typeIndex returns the index of the signature, adding it if new.
func (m *module) typeIndex(params, results int) uint32 {
	t := funcType{params, results}
	for i, have := range m.types {
		if have == t {
			return uint32(i)
		}
	}
	m.types = append(m.types, t)
	return uint32(len(m.types) - 1)
}

// importFunc adds a function import and returns its function index. All
// imports must be added before the first call to funcIndex.
func (m *module) importFunc(mod, name string, params, results int) uint32 {
	m.imports = append(m.imports, funcImport{mod, name, m.typeIndex(params, results)})
	return uint32(len(m.imports) - 1)
}

// addFunc adds a defined function exported under the given names (possibly
// none) and returns its function index.
func (m *module) addFunc(params, results, locals int, body []byte, exports ...string) uint32 {
	m.funcs = append(m.funcs, function{m.typeIndex(params, results), locals, body, exports})
	return uint32(len(m.imports) + len(m.funcs) - 1)
}

// encode returns the binary module.
func (m *module) encode() []byte {
	out := append([]byte(wasmMagic), wasmVersion...)

	var p []byte
	p = appendU32(p, uint32(len(m.types)))
	for _, t := range m.types {
		p = append(p, funcTypeID)
		p = appendU32(p, uint32(t.params))
		for range t.params {
			p = append(p, i32)
		}
		p = appendU32(p, uint32(t.results))
		for range t.results {
			p = append(p, i32)
		}
	}
	out = appendSection(out, secType, p)

	if len(m.imports) > 0 {
		p = appendU32(nil, uint32(len(m.imports)))
		for _, im := range m.imports {
			p = appendName(p, im.module)
			p = appendName(p, im.name)
			p = append(p, kindFunc)
			p = appendU32(p, im.typeIdx)
		}
		out = appendSection(out, secImport, p)
	}

	p = appendU32(nil, uint32(len(m.funcs)))
	for _, f := range m.funcs {
		p = appendU32(p, f.typeIdx)
	}
	out = appendSection(out, secFunction, p)

	// One memory: limits flag 0x00 means "minimum only, no maximum".
	p = appendU32(nil, 1)
	p = append(p, 0x00)
	p = appendU32(p, m.memPages)
	out = appendSection(out, secMemory, p)

	if m.heapGlobal != nil {
		p = appendU32(nil, 1)
		p = append(p, i32, 0x01) // type i32, mutable
		p = append(p, expr(i32Const(*m.heapGlobal))...)
		out = appendSection(out, secGlobal, p)
	}

	var exports []byte
	n := 0
	if m.memExport != "" {
		exports = appendName(exports, m.memExport)
		exports = append(exports, kindMemory)
		exports = appendU32(exports, 0)
		n++
	}
	for i, f := range m.funcs {
		for _, name := range f.exports {
			exports = appendName(exports, name)
			exports = append(exports, kindFunc)
			exports = appendU32(exports, uint32(len(m.imports)+i))
			n++
		}
	}
	out = appendSection(out, secExport, append(appendU32(nil, uint32(n)), exports...))

	p = appendU32(nil, uint32(len(m.funcs)))
	for _, f := range m.funcs {
		var body []byte
		if f.locals > 0 {
			body = appendU32(body, 1) // one run of locals ...
			body = appendU32(body, uint32(f.locals))
			body = append(body, i32) // ... all of type i32
		} else {
			body = appendU32(body, 0)
		}
		body = append(body, f.body...)
		p = appendU32(p, uint32(len(body)))
		p = append(p, body...)
	}
	out = appendSection(out, secCode, p)

	if len(m.data) > 0 {
		p = appendU32(nil, uint32(len(m.data)))
		for _, d := range m.data {
			p = appendU32(p, 0) // memory index 0
			p = append(p, expr(i32Const(d.offset))...)
			p = appendU32(p, uint32(len(d.bytes)))
			p = append(p, d.bytes...)
		}
		out = appendSection(out, secData, p)
	}
	return out
}
