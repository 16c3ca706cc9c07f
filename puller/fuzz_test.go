package puller

// Fuzz targets for the parts of the puller that read what a pod or a
// registry sends: image references, manifests and indexes, and tar layers.
// Run one with
//
//	go test -run '^$' -fuzz '^FuzzExtractFromTar$' -fuzztime 15s ./puller/
//
// (test/fuzz.sh runs each for a fixed time). Seeds are added with f.Add
// below and committed under testdata/fuzz/<FuzzName>/seed-*; plain
// `go test` runs every seed, and any crasher the fuzzer writes there.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// referenceSeeds are references as pods write them, good and bad.
var referenceSeeds = []string{
	"ghcr.io/acme/filters/header:1.2.0",
	"ghcr.io/acme/header@sha256:" + hexA,
	"ghcr.io/acme/header:1.0@sha256:" + hexB,
	"oci://registry.local:5000/a/b@sha256:" + hexA,
	"registry.local:5000/a/b/c:v1.0-rc.1",
	"localhost/x",
	"localhost:5000/x:y",
	"[::1]:5000/wasm/filter:1",
	"busybox",
	"acme/filter",
	"docker.io/busybox",
	"docker.io/library/busybox:latest",
	"index.docker.io/acme/x",
	"  ghcr.io/a/b:c  ",
	"oci://",
	"oci://oci://x",
	"ghcr.io/a/b:",
	"ghcr.io/a/b@",
	"ghcr.io/a/b@sha256:abc",
	"ghcr.io/a/b@@sha256:" + hexA,
	"GHCR.io/A/b:1",
	"a:1/b",
	"x@sha256:" + hexA,
	"ghcr.io/a/b:" + strings.Repeat("t", 129),
	"",
}

// FuzzParseReference: ParseReference never panics, and what it accepts has
// a canonical form that parses back to the same reference.
func FuzzParseReference(f *testing.F) {
	for _, s := range referenceSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ref, err := ParseReference(s)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidReference) {
				t.Fatalf("ParseReference(%q): error %v is not errdefs.ErrInvalidReference", s, err)
			}
			return
		}
		if ref.Original != s {
			t.Errorf("ParseReference(%q).Original = %q", s, ref.Original)
		}
		if len(ref.Name()) > MaxNameLength {
			t.Fatalf("ParseReference(%q): name of %d characters accepted", s, len(ref.Name()))
		}
		if ref.Registry == "" || ref.Repository == "" || (ref.Tag == "") == (ref.Digest == "") {
			t.Fatalf("ParseReference(%q) = %+v: want a registry, a repository, and a tag or a digest", s, ref)
		}
		if ref.Digest != "" && ref.Digest.Validate() != nil {
			t.Errorf("ParseReference(%q): digest %q does not validate", s, ref.Digest)
		}
		canon := ref.String()
		again, err := ParseReference(canon)
		if err != nil {
			t.Fatalf("ParseReference(%q) = %q, which does not parse: %v", s, canon, err)
		}
		again.Original = ref.Original
		if again != ref {
			t.Fatalf("ParseReference(%q) = %+v; its String %q parses to %+v", s, ref, canon, again)
		}
		if again.String() != canon {
			t.Fatalf("String is not stable: %q then %q", canon, again.String())
		}
		if !strings.HasPrefix(canon, ref.Name()) || ref.ByDigest(digest.FromString(s)).Name() != ref.Name() {
			t.Errorf("Name %q does not prefix %q", ref.Name(), canon)
		}
	})
}

// manifestSeeds are manifests and indexes of every layout, and broken ones.
func manifestSeeds() [][]byte {
	d := func(mt string, n byte) ocispec.Descriptor { return desc(mt, n) }
	entry := func(n byte, os, arch string) ocispec.Descriptor {
		e := desc(MediaTypeOCIManifest, n)
		if os != "" || arch != "" {
			e.Platform = &ocispec.Platform{OS: os, Architecture: arch}
		}
		return e
	}
	docs := []any{
		manifestDoc{SchemaVersion: 2, MediaType: MediaTypeOCIManifest, Config: cfg(MediaTypeWasmConfigV0), Layers: []ocispec.Descriptor{d(MediaTypeWasmLayer, 1)}},
		manifestDoc{SchemaVersion: 2, Config: cfg(MediaTypeWasmToOCIConfig), Layers: []ocispec.Descriptor{d(MediaTypeWasmToOCILayer, 1)}},
		manifestDoc{SchemaVersion: 2, Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{d(MediaTypeSoloConfig, 1), d(MediaTypeSoloLayer, 2)}},
		manifestDoc{SchemaVersion: 2, MediaType: MediaTypeDockerManifest, Config: cfg(MediaTypeDockerConfig),
			Layers: []ocispec.Descriptor{d(MediaTypeDockerLayerGzip, 1), d(MediaTypeDockerLayerGzip, 2)}},
		manifestDoc{SchemaVersion: 2, Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{d(MediaTypeOCILayerZstd, 1)}},
		manifestDoc{SchemaVersion: 2, Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{d(MediaTypeOCILayerTar, 1)}},
		manifestDoc{SchemaVersion: 2, Config: cfg(MediaTypeWasmConfigV0), Layers: []ocispec.Descriptor{d(MediaTypeWasmLayer, 1), d(MediaTypeSoloLayer, 2)}},
		manifestDoc{SchemaVersion: 2, Config: cfg("application/x-unknown"), Layers: []ocispec.Descriptor{d("application/x-unknown", 1)}},
		manifestDoc{SchemaVersion: 2, Config: cfg(MediaTypeOCIConfig)},
		manifestDoc{SchemaVersion: 2, MediaType: MediaTypeOCIIndex, Manifests: []ocispec.Descriptor{
			entry(1, "linux", "amd64"), entry(2, "wasip1", "wasm"), entry(3, "wasi", "wasm")}},
		manifestDoc{SchemaVersion: 2, MediaType: MediaTypeDockerManifestList, Manifests: []ocispec.Descriptor{entry(1, "", "")}},
		manifestDoc{SchemaVersion: 2, Manifests: []ocispec.Descriptor{entry(1, "linux", "arm64"), entry(2, "windows", "amd64")}},
		manifestDoc{SchemaVersion: 2, MediaType: MediaTypeOCIIndex},
	}
	var out [][]byte
	for _, doc := range docs {
		b, err := json.Marshal(doc)
		if err != nil {
			panic(err)
		}
		out = append(out, b)
	}
	return append(out,
		[]byte(`{}`),
		[]byte(`null`),
		[]byte(`[]`),
		[]byte(`{"layers":null,"config":null,"manifests":[null]}`),
		[]byte(`{"layers":[{"mediaType":"application/wasm","size":-1,"digest":"sha256:x"}]}`),
		[]byte(`{"manifests":[{"platform":null},{"platform":{}}]}`),
		[]byte(`{"config":{"mediaType":7}}`),
		[]byte(`not json`),
	)
}

// FuzzSelectModule: whatever bytes a registry sends as a manifest, format
// detection never panics, and what it selects is one of the manifest's own
// layers (or index entries), with a layout that matches its media type.
func FuzzSelectModule(f *testing.F) {
	for _, b := range manifestSeeds() {
		f.Add(b, "")
		f.Add(b, MediaTypeOCIIndex)
	}
	node := Platform{OS: "linux", Architecture: "amd64"}
	f.Fuzz(func(t *testing.T, b []byte, contentType string) {
		m, err := parseManifest(b)
		if err != nil {
			return
		}
		_ = m.isIndex(contentType)
		_ = describe(m)
		if src, err := selectModule(m); err == nil {
			if !containsDescriptor(m.Layers, src.Layer) {
				t.Fatalf("selected layer %+v is not one of the manifest's layers", src.Layer)
			}
			if src.Tar {
				comp, ok := tarLayer(src.Layer.MediaType)
				if !ok || comp != src.Compression || src.Layout != LayoutImage {
					t.Fatalf("tar selection %+v does not match media type %q", src, src.Layer.MediaType)
				}
				if !reflect.DeepEqual(src.Layer, m.Layers[len(m.Layers)-1]) {
					t.Fatalf("tar selection is not the last layer")
				}
			} else if layout, ok := rawWasmLayer(src.Layer.MediaType); !ok || layout != src.Layout {
				t.Fatalf("raw selection %+v does not match media type %q", src, src.Layer.MediaType)
			}
		}
		if child, err := selectFromIndex(m, node); err == nil {
			if !containsDescriptor(m.Manifests, child) {
				t.Fatalf("selected entry %+v is not one of the index's entries", child)
			}
		}
	})
}

func containsDescriptor(ds []ocispec.Descriptor, d ocispec.Descriptor) bool {
	for _, x := range ds {
		if reflect.DeepEqual(x, d) {
			return true
		}
	}
	return false
}

// fuzzMaxOut caps what a fuzzed layer may expand to: small, so that a bomb
// is refused in microseconds.
const fuzzMaxOut = 1 << 20

// tarSeeds are the tar layers of the hostile-image tests, built with
// archive/tar, by name.
func tarSeeds() map[string][]byte {
	type entry struct {
		name, link string
		typ        byte
		body       []byte
		size       int64 // when body is nil: that many zeros
	}
	build := func(entries ...entry) []byte {
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		for _, e := range entries {
			h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: 0o644, Size: int64(len(e.body))}
			if e.body == nil {
				h.Size = e.size
			}
			if e.typ != tar.TypeReg {
				h.Size = 0
			}
			if e.typ == tar.TypeChar {
				h.Devmajor, h.Devminor = 1, 3
			}
			if err := tw.WriteHeader(h); err != nil {
				panic(err)
			}
			if e.body != nil {
				tw.Write(e.body)
			} else if h.Size > 0 {
				io.CopyN(tw, zeros{}, h.Size)
			}
		}
		tw.Close()
		return b.Bytes()
	}
	mod := append(append([]byte{}, wasmHeader...), "module"...)
	reg := func(name string) entry { return entry{name: name, typ: tar.TypeReg, body: mod} }
	return map[string][]byte{
		"plugin":     build(reg("plugin.wasm")),
		"nested":     build(entry{name: "a/", typ: tar.TypeDir}, entry{name: "a/b/", typ: tar.TypeDir}, reg("a/b/plugin.wasm")),
		"only-wasm":  build(entry{name: "etc/", typ: tar.TypeDir}, reg("filter.wasm"), entry{name: "README", typ: tar.TypeReg, body: []byte("hi")}),
		"symlink":    build(entry{name: "plugin.wasm", typ: tar.TypeSymlink, link: "/etc/shadow"}),
		"hardlink":   build(reg("x.wasm"), entry{name: "plugin.wasm", typ: tar.TypeLink, link: "x.wasm"}),
		"dotdot":     build(reg("../plugin.wasm")),
		"absolute":   build(reg("/plugin.wasm")),
		"device":     build(entry{name: "dev/null", typ: tar.TypeChar}, reg("plugin.wasm")),
		"two":        build(reg("a.wasm"), reg("b.wasm")),
		"two-plugin": build(reg("a/plugin.wasm"), reg("b/plugin.wasm")),
		"plugin-won": build(reg("other.wasm"), reg("x/plugin.wasm"), reg("more.wasm")),
		"empty":      build(),
		// 2 MiB of zeros: a small bomb once compressed, over fuzzMaxOut.
		"bomb": build(entry{name: "big.bin", typ: tar.TypeReg, size: 2 << 20}, reg("plugin.wasm")),
	}
}

func compress(c Compression, b []byte) []byte {
	var out bytes.Buffer
	switch c {
	case CompressionGzip:
		zw, _ := gzip.NewWriterLevel(&out, gzip.BestCompression)
		zw.Write(b)
		zw.Close()
	case CompressionZstd:
		zw, err := zstd.NewWriter(nil)
		if err != nil {
			panic(err)
		}
		defer zw.Close()
		return zw.EncodeAll(b, nil)
	default:
		return b
	}
	return out.Bytes()
}

// boundSink records what extractFromTar writes, and the most bytes it held
// between resets.
type boundSink struct {
	buf bytes.Buffer
	max int
}

func (s *boundSink) Write(p []byte) (int, error) {
	s.buf.Write(p)
	s.max = max(s.max, s.buf.Len())
	return len(p), nil
}

func (s *boundSink) Reset() error { s.buf.Reset(); return nil }

// FuzzExtractFromTar: any bytes, as a tar with any compression, never
// panic the extraction, never put more than maxModule bytes in the sink,
// and never yield a module from a layer with a link, a device or an
// escaping name. A module it yields is the bytes of the one right entry.
func FuzzExtractFromTar(f *testing.F) {
	names := make([]string, 0, 16)
	seeds := tarSeeds()
	for name := range seeds {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		for c := CompressionNone; c <= CompressionZstd; c++ {
			f.Add(compress(c, seeds[name]), byte(c), uint32(1<<16))
		}
	}
	f.Add(seeds["plugin"], byte(CompressionNone), uint32(3)) // over the limit
	f.Add([]byte{}, byte(CompressionGzip), uint32(0))
	f.Fuzz(func(t *testing.T, data []byte, comp byte, limit uint32) {
		c := Compression(comp % 3)
		maxModule := int64(limit % (fuzzMaxOut + 1))
		r, closeFn, err := decompress(bytes.NewReader(data), c, fuzzMaxOut)
		if err != nil {
			return
		}
		var sink boundSink
		name, err := extractFromTar(r, &sink, maxModule, make([]byte, 4096))
		closeFn()
		if int64(sink.max) > maxModule {
			t.Fatalf("the sink was given %d bytes, over the limit of %d", sink.max, maxModule)
		}
		if err != nil {
			return
		}
		// Read the layer again, independently: every entry up to the end
		// of the tar is acceptable, and the chosen one is the right one
		// with the bytes the sink got.
		r, closeFn, err = decompress(bytes.NewReader(data), c, fuzzMaxOut)
		if err != nil {
			t.Fatalf("decompressing again: %v", err)
		}
		defer closeFn()
		tr := tar.NewReader(r)
		var plugins, others int
		var body []byte
		for {
			hdr, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("extraction chose %q, but reading the tar again fails: %v", name, err)
			}
			switch hdr.Typeflag {
			case tar.TypeSymlink, tar.TypeLink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
				t.Fatalf("extraction chose %q from a layer with a %q entry %q", name, hdr.Typeflag, hdr.Name)
			}
			if strings.HasPrefix(hdr.Name, "/") || strings.Contains("/"+hdr.Name+"/", "/../") {
				t.Fatalf("extraction chose %q from a layer with entry %q", name, hdr.Name)
			}
			if hdr.Typeflag != tar.TypeReg && hdr.Typeflag != tar.TypeRegA {
				continue
			}
			base := path.Base(hdr.Name)
			isPlugin := base == "plugin.wasm"
			isOther := !isPlugin && strings.HasSuffix(base, ".wasm") && base != ".wasm"
			if isPlugin {
				plugins++
			} else if isOther {
				others++
			}
			if hdr.Name == name && body == nil && (isPlugin || isOther) {
				if body, err = io.ReadAll(tr); err != nil {
					t.Fatal(err)
				}
			}
		}
		wantPlugin := path.Base(name) == "plugin.wasm"
		if (wantPlugin && plugins != 1) || (!wantPlugin && (plugins != 0 || others != 1)) {
			t.Fatalf("extraction chose %q from a layer with %d plugin.wasm and %d other *.wasm", name, plugins, others)
		}
		if !bytes.Equal(body, sink.buf.Bytes()) {
			t.Fatalf("the sink holds %d bytes, entry %q has %d", sink.buf.Len(), name, len(body))
		}
	})
}

// The committed seed corpus (testdata/fuzz/<FuzzName>/seed-*) is written by
// this generator: run `WASM_CSI_UPDATE_FUZZ_CORPUS=1 go test -run
// TestFuzzSeedCorpus ./puller/` after changing it. Without the variable
// the test checks the committed files are there. (Not byte for byte: the
// compressed seeds change with the compressor's version.)

// corpusFile encodes values in the go fuzz corpus format ("go test fuzz v1").
func corpusFile(vals ...any) []byte {
	var b bytes.Buffer
	b.WriteString("go test fuzz v1\n")
	for _, v := range vals {
		switch v := v.(type) {
		case []byte:
			fmt.Fprintf(&b, "[]byte(%q)\n", v)
		case string:
			fmt.Fprintf(&b, "string(%q)\n", v)
		case byte:
			fmt.Fprintf(&b, "byte(%q)\n", v)
		case uint32:
			fmt.Fprintf(&b, "uint32(%d)\n", v)
		default:
			panic(fmt.Sprintf("unsupported corpus type %T", v))
		}
	}
	return b.Bytes()
}

func seedCorpus() map[string][]byte {
	out := map[string][]byte{}
	for i, s := range []string{"ghcr.io/acme/filters/header:1.2.0", "oci://registry.local:5000/a/b:t@sha256:" + hexA, "acme/filter", "[::1]:5000/x:y", "ghcr.io/a/b:"} {
		out[fmt.Sprintf("FuzzParseReference/seed-%d", i)] = corpusFile(s)
	}
	ms := manifestSeeds()
	for i, j := range []int{0, 3, 6, 9, 11} {
		out[fmt.Sprintf("FuzzSelectModule/seed-%d", i)] = corpusFile(ms[j], "")
	}
	tars := tarSeeds()
	for _, s := range []struct {
		name string
		c    Compression
	}{
		{"plugin", CompressionNone}, {"nested", CompressionGzip}, {"symlink", CompressionNone}, {"hardlink", CompressionZstd},
		{"dotdot", CompressionGzip}, {"two", CompressionZstd}, {"plugin-won", CompressionNone}, {"bomb", CompressionGzip},
	} {
		out["FuzzExtractFromTar/seed-"+s.name] = corpusFile(compress(s.c, tars[s.name]), byte(s.c), uint32(1<<16))
	}
	return out
}

func TestFuzzSeedCorpus(t *testing.T) {
	update := os.Getenv("WASM_CSI_UPDATE_FUZZ_CORPUS") != ""
	for name, want := range seedCorpus() {
		p := filepath.Join("testdata", "fuzz", filepath.FromSlash(name))
		if update {
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(p)
		if err != nil {
			t.Errorf("seed corpus file missing: %v (regenerate with WASM_CSI_UPDATE_FUZZ_CORPUS=1)", err)
			continue
		}
		if first, _, _ := bytes.Cut(got, []byte("\n")); !bytes.Equal(first, []byte("go test fuzz v1")) || bytes.Count(got, []byte("\n")) != bytes.Count(want, []byte("\n")) {
			t.Errorf("%s is not a corpus file of the generator's shape (regenerate with WASM_CSI_UPDATE_FUZZ_CORPUS=1)", p)
		}
	}
}
