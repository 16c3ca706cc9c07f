package registrytest

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
)

// moduleSectionName is the name of the custom section that pads generated
// modules to the requested size.
const moduleSectionName = "registrytest"

// Module returns a valid WebAssembly module (header plus one custom section)
// of exactly size bytes, or of the smallest size that can hold name when
// size is smaller. The bytes are a deterministic function of name and size:
// different names give different modules (and digests). The padding is
// pseudo-random, so it does not compress.
func Module(name string, size int) []byte {
	buf := make([]byte, 0, max(size, minModuleSize(name)))
	w := &sliceWriter{b: buf}
	// Writing to memory cannot fail.
	_ = WriteModule(w, name, int64(size))
	return w.b
}

// WriteModule streams the module Module(name, size) would return to w,
// without holding it in memory; use it for big modules. size must fit the
// 32-bit section length of the Wasm binary format.
func WriteModule(w io.Writer, name string, size int64) error {
	if size > 1<<32 {
		return fmt.Errorf("registrytest: module size %d is larger than a Wasm section can be", size)
	}
	payloadHead := []byte(name)
	nameVec := append(uleb128(uint64(len(moduleSectionName))), moduleSectionName...)
	size = max(size, int64(minModuleSize(name)))
	// size = 8 (header) + 1 (section id) + len(uleb(secLen)) + secLen
	var secLen int64
	for l := int64(1); l <= 5; l++ {
		s := size - 9 - l
		if int64(len(uleb128(uint64(s)))) == l {
			secLen = s
			break
		}
	}
	if secLen == 0 {
		// The encodings of lengths around a LEB128 width boundary can make
		// an exact size impossible; one byte more always fits.
		return WriteModule(w, name, size+1)
	}
	fillLen := secLen - int64(len(nameVec)) - int64(len(payloadHead))

	bw := bufio.NewWriterSize(w, 64<<10)
	bw.Write([]byte{0x00, 'a', 's', 'm', 0x01, 0x00, 0x00, 0x00})
	bw.WriteByte(0x00) // custom section
	bw.Write(uleb128(uint64(secLen)))
	bw.Write(nameVec)
	bw.Write(payloadHead)
	seed := sha256.Sum256([]byte(fmt.Sprintf("%s\x00%d", name, size)))
	if _, err := io.CopyN(bw, rand.NewChaCha8(seed), fillLen); err != nil {
		return fmt.Errorf("registrytest: writing module %q: %w", name, err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("registrytest: writing module %q: %w", name, err)
	}
	return nil
}

// WriteModuleFile writes Module(name, size) to a new file at path, streaming.
func WriteModuleFile(path, name string, size int64) (err error) {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("registrytest: creating module file: %w", err)
	}
	defer func() {
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("registrytest: closing module file: %w", cerr)
		}
	}()
	return WriteModule(f, name, size)
}

func minModuleSize(name string) int {
	secLen := len(uleb128(uint64(len(moduleSectionName)))) + len(moduleSectionName) + len(name)
	return 8 + 1 + len(uleb128(uint64(secLen))) + secLen
}

func uleb128(v uint64) []byte {
	var out []byte
	for {
		b := byte(v & 0x7f)
		v >>= 7
		if v != 0 {
			out = append(out, b|0x80)
			continue
		}
		return append(out, b)
	}
}

type sliceWriter struct{ b []byte }

func (s *sliceWriter) Write(p []byte) (int, error) {
	s.b = append(s.b, p...)
	return len(p), nil
}
