package registrytest

import (
	"bytes"
	"fmt"
	"io"
	"os"

	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// Module returns a real proxy-wasm module (test/lib/wasmgen) unique to name:
// different names give different modules and digests. It is padded to
// exactly size bytes when size is at least the smallest padded module
// (about 560 bytes); below that it is the unpadded module. The padding is
// pseudo-random, so it does not compress.
func Module(name string, size int) []byte {
	var b bytes.Buffer
	if err := WriteModule(&b, name, int64(size)); err != nil {
		panic(err) // a bytes.Buffer does not fail
	}
	return b.Bytes()
}

// WriteModule streams Module(name, size) to w without holding it whole.
func WriteModule(w io.Writer, name string, size int64) error {
	opts := wasmgen.Options{Message: name}
	if min := int64(len(wasmgen.ProxyWasm(opts)) + 16); size >= min {
		opts.PadTo = int(size)
	}
	_, err := wasmgen.WriteProxyWasm(w, opts)
	return err
}

// WriteModuleFile writes Module(name, size) to a new file at path.
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
