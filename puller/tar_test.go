package puller

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/klauspost/compress/zstd"
)

// memSink is a Sink that keeps what it is given and counts Resets.
type memSink struct {
	buf    bytes.Buffer
	resets int
	werr   error // returned by Write when set
}

func (s *memSink) Write(p []byte) (int, error) {
	if s.werr != nil {
		return 0, s.werr
	}
	return s.buf.Write(p)
}

func (s *memSink) Reset() error {
	s.resets++
	s.buf.Reset()
	return nil
}

// tarEntry is one entry of a test tar.
type tarEntry struct {
	name     string
	typ      byte
	body     []byte
	linkname string
}

func reg(name string, body string) tarEntry {
	return tarEntry{name: name, typ: tar.TypeReg, body: []byte(body)}
}
func dir(name string) tarEntry { return tarEntry{name: name, typ: tar.TypeDir} }

func buildTar(t testing.TB, entries ...tarEntry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: 0o644, Linkname: e.linkname, Size: int64(len(e.body))}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if e.typ == tar.TypeChar {
			h.Devmajor, h.Devminor = 1, 3
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("tar header %q: %v", e.name, err)
		}
		if h.Size > 0 {
			if _, err := tw.Write(e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestExtractFromTar(t *testing.T) {
	tests := []struct {
		name    string
		entries []tarEntry
		want    string // entry name returned
		body    string // what the sink holds
		resets  int
	}{
		{
			name:    "plugin.wasm at the root",
			entries: []tarEntry{reg("plugin.wasm", "PLUGIN")},
			want:    "plugin.wasm", body: "PLUGIN",
		},
		{
			name:    "plugin.wasm nested, among other files",
			entries: []tarEntry{dir("etc/"), reg("etc/passwd", "root:x:0:0"), dir("a/"), dir("a/b/"), reg("a/b/plugin.wasm", "NESTED"), reg("README", "hi")},
			want:    "a/b/plugin.wasm", body: "NESTED",
		},
		{
			name:    "./plugin.wasm",
			entries: []tarEntry{dir("./"), reg("./plugin.wasm", "DOT")},
			want:    "./plugin.wasm", body: "DOT",
		},
		{
			name:    "a single other wasm",
			entries: []tarEntry{reg("x.txt", "text"), reg("filters/other.wasm", "OTHER")},
			want:    "filters/other.wasm", body: "OTHER",
		},
		{
			name:    "plugin.wasm after other.wasm: plugin wins",
			entries: []tarEntry{reg("other.wasm", "OTHER-LONGER-THAN-PLUGIN"), reg("plugin.wasm", "PLUGIN")},
			want:    "plugin.wasm", body: "PLUGIN", resets: 1,
		},
		{
			name:    "plugin.wasm before other.wasm: plugin wins",
			entries: []tarEntry{reg("plugin.wasm", "PLUGIN"), reg("other.wasm", "OTHER")},
			want:    "plugin.wasm", body: "PLUGIN",
		},
		{
			name:    "empty plugin.wasm after other.wasm",
			entries: []tarEntry{reg("other.wasm", "OTHER"), reg("plugin.wasm", "")},
			want:    "plugin.wasm", body: "", resets: 1,
		},
		{
			name:    "a directory named plugin.wasm is not a candidate",
			entries: []tarEntry{dir("plugin.wasm/"), reg("plugin.wasm/mod.wasm", "INNER")},
			want:    "plugin.wasm/mod.wasm", body: "INNER",
		},
		{
			name:    ".wasm and wasm-like names are not candidates",
			entries: []tarEntry{reg(".wasm", "DOTWASM"), reg("x.wasm.bak", "BAK"), reg("xwasm", "X"), reg("m.wasm", "M")},
			want:    "m.wasm", body: "M",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var sink memSink
			name, err := extractFromTar(bytes.NewReader(buildTar(t, tt.entries...)), &sink, 1<<20, make([]byte, 7))
			if err != nil {
				t.Fatalf("extractFromTar: %v", err)
			}
			if name != tt.want {
				t.Errorf("name = %q, want %q", name, tt.want)
			}
			if got := sink.buf.String(); got != tt.body {
				t.Errorf("sink holds %q, want %q", got, tt.body)
			}
			if sink.resets != tt.resets {
				t.Errorf("%d resets, want %d", sink.resets, tt.resets)
			}
		})
	}
}

func TestExtractFromTarRefused(t *testing.T) {
	tests := []struct {
		name    string
		entries []tarEntry
		want    string // substring of the message
	}{
		{
			name:    "two plugin.wasm",
			entries: []tarEntry{reg("a/plugin.wasm", "A"), reg("b/plugin.wasm", "B")},
			want:    "2 files named plugin.wasm",
		},
		{
			name:    "two plugin.wasm and another",
			entries: []tarEntry{reg("x.wasm", "X"), reg("plugin.wasm", "A"), reg("plugin.wasm", "B")},
			want:    "2 files named plugin.wasm",
		},
		{
			name:    "two wasm and no plugin",
			entries: []tarEntry{reg("a.wasm", "A"), reg("dir/b.wasm", "B")},
			want:    "2 *.wasm files and no plugin.wasm",
		},
		{
			name:    "no wasm",
			entries: []tarEntry{reg("README", "x"), dir("bin/"), reg("bin/sh", "ELF")},
			want:    "no plugin.wasm and no *.wasm",
		},
		{
			name:    "empty tar",
			entries: nil,
			want:    "no plugin.wasm and no *.wasm",
		},
		{
			name:    "symlink",
			entries: []tarEntry{{name: "plugin.wasm", typ: tar.TypeSymlink, linkname: "/etc/shadow"}},
			want:    `tar entry "plugin.wasm" is a link (to "/etc/shadow")`,
		},
		{
			name:    "symlink with another name",
			entries: []tarEntry{reg("plugin.wasm", "P"), {name: "lib", typ: tar.TypeSymlink, linkname: "/"}},
			want:    `tar entry "lib" is a link (to "/")`,
		},
		{
			name:    "hardlink",
			entries: []tarEntry{reg("real.bin", "R"), {name: "plugin.wasm", typ: tar.TypeLink, linkname: "real.bin"}},
			want:    `tar entry "plugin.wasm" is a link (to "real.bin")`,
		},
		{
			name:    "char device",
			entries: []tarEntry{{name: "dev/null.wasm", typ: tar.TypeChar}},
			want:    `tar entry "dev/null.wasm" is not a regular file (type '3')`,
		},
		{
			name:    "fifo",
			entries: []tarEntry{reg("plugin.wasm", "P"), {name: "pipe", typ: tar.TypeFifo}},
			want:    `tar entry "pipe" is not a regular file (type '6')`,
		},
		{
			name:    "block device",
			entries: []tarEntry{{name: "sda", typ: tar.TypeBlock}},
			want:    `tar entry "sda" is not a regular file (type '4')`,
		},
		{
			name:    "dotdot name",
			entries: []tarEntry{reg("../x.wasm", "ESCAPE")},
			want:    `"../x.wasm" climbs out with ..`,
		},
		{
			name:    "dotdot in the middle",
			entries: []tarEntry{reg("a/../../plugin.wasm", "ESCAPE")},
			want:    `"a/../../plugin.wasm" climbs out with ..`,
		},
		{
			name:    "absolute name",
			entries: []tarEntry{reg("/abs.wasm", "ABS")},
			want:    `"/abs.wasm" has an absolute name`,
		},
		{
			name:    "dotdot name after the module",
			entries: []tarEntry{reg("plugin.wasm", "P"), reg("../etc/cron.d/x", "ESCAPE")},
			want:    `"../etc/cron.d/x" climbs out with ..`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var sink memSink
			name, err := extractFromTar(bytes.NewReader(buildTar(t, tt.entries...)), &sink, 1<<20, make([]byte, 512))
			if err == nil {
				t.Fatalf("extractFromTar = %q, want an error", name)
			}
			if name != "" {
				t.Errorf("name = %q with an error", name)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("message %q does not contain %q", err.Error(), tt.want)
			}
			if strings.Contains(sink.buf.String(), "ESCAPE") {
				t.Errorf("an escaping entry reached the sink: %q", sink.buf.String())
			}
		})
	}
}

func TestExtractFromTarSizeLimit(t *testing.T) {
	const limit = 1000
	for _, tt := range []struct {
		name    string
		entries []tarEntry
		size    int64
		what    string
	}{
		{"plugin too large", []tarEntry{reg("plugin.wasm", strings.Repeat("x", limit+1))}, limit + 1, "module plugin.wasm"},
		{"other too large", []tarEntry{reg("a/m.wasm", strings.Repeat("x", 5000))}, 5000, "module a/m.wasm"},
		{"plugin too large after a small other", []tarEntry{reg("m.wasm", "small"), reg("plugin.wasm", strings.Repeat("x", 2000))}, 2000, "module plugin.wasm"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var sink memSink
			_, err := extractFromTar(bytes.NewReader(buildTar(t, tt.entries...)), &sink, limit, make([]byte, 512))
			var se *sizeError
			if !errors.As(err, &se) {
				t.Fatalf("error %v is not a *sizeError", err)
			}
			if se.what != tt.what || se.size != tt.size || se.limit != limit {
				t.Errorf("sizeError = %+v, want what %q size %d limit %d", *se, tt.what, tt.size, limit)
			}
			if sink.buf.Len() != 0 {
				t.Errorf("%d bytes of an oversized module reached the sink", sink.buf.Len())
			}
		})
	}
	// Exactly at the limit is fine.
	var sink memSink
	body := strings.Repeat("y", limit)
	if _, err := extractFromTar(bytes.NewReader(buildTar(t, reg("plugin.wasm", body))), &sink, limit, make([]byte, 512)); err != nil {
		t.Fatalf("a module of exactly the limit: %v", err)
	}
	if sink.buf.String() != body {
		t.Errorf("sink holds %d bytes, want %d", sink.buf.Len(), limit)
	}
}

func TestExtractFromTarSinkError(t *testing.T) {
	boom := errors.New("disk on fire")
	sink := memSink{werr: boom}
	_, err := extractFromTar(bytes.NewReader(buildTar(t, reg("plugin.wasm", "PLUGIN"))), &sink, 1<<20, make([]byte, 512))
	if !errors.Is(err, boom) {
		t.Fatalf("error %v does not wrap the sink's", err)
	}
	// Through a headerSink, as the puller streams.
	hs := &headerSink{Sink: &memSink{werr: boom}, limit: 1 << 20}
	_, err = extractFromTar(bytes.NewReader(buildTar(t, reg("plugin.wasm", "PLUGIN"))), hs, 1<<20, make([]byte, 512))
	if !errors.Is(err, boom) {
		t.Fatalf("through a headerSink: error %v does not wrap the sink's", err)
	}
}

func TestExtractFromTarTruncated(t *testing.T) {
	b := buildTar(t, reg("plugin.wasm", strings.Repeat("z", 4000)))
	var sink memSink
	if _, err := extractFromTar(bytes.NewReader(b[:2048]), &sink, 1<<20, make([]byte, 512)); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated tar: error %v, want io.ErrUnexpectedEOF", err)
	}
}

func gzipBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	zw, err := gzip.NewWriterLevel(&out, gzip.BestCompression)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func zstdBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	zw, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer zw.Close()
	return zw.EncodeAll(b, nil)
}

func TestDecompressRoundTrip(t *testing.T) {
	plain := make([]byte, 300_000)
	for i := range plain {
		plain[i] = byte(i*7 + i/1000)
	}
	for _, tt := range []struct {
		name string
		c    Compression
		in   []byte
	}{
		{"none", CompressionNone, plain},
		{"gzip", CompressionGzip, gzipBytes(t, plain)},
		{"gzip multistream", CompressionGzip, append(gzipBytes(t, plain[:1000]), gzipBytes(t, plain[1000:])...)},
		{"zstd", CompressionZstd, zstdBytes(t, plain)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r, closeFn, err := decompress(iotest.HalfReader(bytes.NewReader(tt.in)), tt.c, int64(len(plain)))
			if err != nil {
				t.Fatal(err)
			}
			defer closeFn()
			got, err := io.ReadAll(r)
			if err != nil {
				t.Fatalf("reading: %v", err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatalf("got %d bytes, want the %d bytes put in", len(got), len(plain))
			}
		})
	}
}

func TestDecompressTarLayers(t *testing.T) {
	// A compressed image layer, end to end: the module comes out exactly.
	mod := append(append([]byte{}, wasmHeader...), bytes.Repeat([]byte("module"), 10000)...)
	layer := buildTar(t, dir("app/"), reg("app/other.wasm", "OTHER"), tarEntry{name: "app/plugin.wasm", typ: tar.TypeReg, body: mod})
	for _, tt := range []struct {
		name string
		c    Compression
		in   []byte
	}{
		{"tar", CompressionNone, layer},
		{"tar+gzip", CompressionGzip, gzipBytes(t, layer)},
		{"tar+zstd", CompressionZstd, zstdBytes(t, layer)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r, closeFn, err := decompress(bytes.NewReader(tt.in), tt.c, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			defer closeFn()
			var sink memSink
			hs := &headerSink{Sink: &sink, limit: 1 << 20}
			name, err := extractFromTar(r, hs, 1<<20, make([]byte, 4096))
			if err != nil {
				t.Fatal(err)
			}
			if name != "app/plugin.wasm" || !bytes.Equal(sink.buf.Bytes(), mod) || !hs.valid() || hs.n != int64(len(mod)) {
				t.Errorf("name %q, %d bytes (want %d), valid %v, n %d", name, sink.buf.Len(), len(mod), hs.valid(), hs.n)
			}
		})
	}
}

func TestDecompressGarbage(t *testing.T) {
	garbage := []byte("this is not compressed at all, just text claiming to be")
	r, closeFn, err := decompress(bytes.NewReader(garbage), CompressionGzip, 1<<20)
	if err == nil {
		closeFn()
		t.Fatalf("gzip of garbage: decompress succeeded with %T", r)
	}
	if !errors.Is(err, gzip.ErrHeader) || !strings.Contains(err.Error(), "not the gzip it claims") {
		t.Errorf("gzip of garbage: error %v", err)
	}
	// zstd decoders report a bad frame on the first read.
	r, closeFn, err = decompress(bytes.NewReader(garbage), CompressionZstd, 1<<20)
	if err == nil {
		defer closeFn()
		_, err = io.ReadAll(r)
	}
	if err == nil {
		t.Fatal("zstd of garbage: no error")
	}
	// A gzip stream cut short.
	gz := gzipBytes(t, bytes.Repeat([]byte("abc"), 10000))
	r, closeFn, err = decompress(bytes.NewReader(gz[:len(gz)/2]), CompressionGzip, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	if _, err := io.ReadAll(r); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated gzip: error %v, want io.ErrUnexpectedEOF", err)
	}
}

// switchWriter writes to w, which may be changed between writes.
type switchWriter struct{ w io.Writer }

func (s *switchWriter) Write(p []byte) (int, error) { return s.w.Write(p) }

// zeros is an endless reader of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func TestDecompressGzipBomb(t *testing.T) {
	const (
		expanded = 64 << 20
		limit    = 1 << 20
	)
	// 64 MiB of zeros, compressed, and the same inside a tar (a bomb in a
	// file that is not a candidate still has to be read through). Both are
	// gzip multistreams of one 1 MiB member repeated, which is quick to
	// build even under the race detector; the decoder reads them as one.
	member := gzipBytes(t, make([]byte, 1<<20))
	var raw bytes.Buffer
	for range expanded >> 20 {
		raw.Write(member)
	}
	var head, tail bytes.Buffer
	sw := &switchWriter{w: &head}
	tw := tar.NewWriter(sw)
	tw.WriteHeader(&tar.Header{Name: "big.bin", Typeflag: tar.TypeReg, Mode: 0o644, Size: expanded})
	sw.w = io.Discard // the zeros are the repeated member
	if _, err := io.CopyN(tw, zeros{}, expanded); err != nil {
		t.Fatal(err)
	}
	sw.w = &tail
	tw.WriteHeader(&tar.Header{Name: "plugin.wasm", Typeflag: tar.TypeReg, Mode: 0o644, Size: 8})
	tw.Write(wasmHeader)
	tw.Close()
	var inTar bytes.Buffer
	inTar.Write(gzipBytes(t, head.Bytes()))
	inTar.Write(raw.Bytes())
	inTar.Write(gzipBytes(t, tail.Bytes()))
	if head.Len() != 512 || raw.Len() > 1<<20 || inTar.Len() > 1<<20 {
		t.Fatalf("tar header %d bytes; the bombs are %d and %d bytes; expected them to compress well", head.Len(), raw.Len(), inTar.Len())
	}

	measure := func(f func()) uint64 {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		f()
		runtime.ReadMemStats(&after)
		return after.TotalAlloc - before.TotalAlloc
	}
	const maxAlloc = 4 << 20

	var err error
	alloc := measure(func() {
		var r io.Reader
		var closeFn func()
		r, closeFn, err = decompress(bytes.NewReader(raw.Bytes()), CompressionGzip, limit)
		if err != nil {
			return
		}
		defer closeFn()
		_, err = io.CopyBuffer(io.Discard, r, make([]byte, 32<<10))
	})
	if !errors.Is(err, errLayerTooLarge) {
		t.Errorf("gzip bomb: error %v, want errLayerTooLarge", err)
	}
	t.Logf("gzip bomb: %d bytes allocated", alloc)
	if alloc > maxAlloc {
		t.Errorf("gzip bomb: %d bytes allocated, want under %d", alloc, maxAlloc)
	}

	var sink memSink
	alloc = measure(func() {
		var r io.Reader
		var closeFn func()
		r, closeFn, err = decompress(bytes.NewReader(inTar.Bytes()), CompressionGzip, limit)
		if err != nil {
			return
		}
		defer closeFn()
		_, err = extractFromTar(r, &sink, limit, make([]byte, 32<<10))
	})
	if !errors.Is(err, errLayerTooLarge) {
		t.Errorf("gzip bomb in a tar: error %v, want errLayerTooLarge", err)
	}
	t.Logf("gzip bomb in a tar: %d bytes allocated", alloc)
	if alloc > maxAlloc {
		t.Errorf("gzip bomb in a tar: %d bytes allocated, want under %d", alloc, maxAlloc)
	}
	if sink.buf.Len() != 0 {
		t.Errorf("%d bytes reached the sink", sink.buf.Len())
	}
}

func TestDecompressZstdBomb(t *testing.T) {
	zw, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	var bomb bytes.Buffer
	zw.Reset(&bomb)
	if _, err := io.CopyN(zw, zeros{}, 64<<20); err != nil {
		t.Fatal(err)
	}
	zw.Close()
	r, closeFn, err := decompress(bytes.NewReader(bomb.Bytes()), CompressionZstd, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	n, err := io.Copy(io.Discard, r)
	if !errors.Is(err, errLayerTooLarge) {
		t.Errorf("zstd bomb: error %v, want errLayerTooLarge", err)
	}
	if n != 1<<20 {
		t.Errorf("zstd bomb: %d bytes passed before the refusal, want exactly %d", n, 1<<20)
	}
}

func TestLimitReader(t *testing.T) {
	const n = 1000
	data := bytes.Repeat([]byte("0123456789"), 100) // exactly n bytes
	for _, tt := range []struct {
		name string
		r    func([]byte) io.Reader
	}{
		{"plain", func(b []byte) io.Reader { return bytes.NewReader(b) }},
		{"one byte at a time", func(b []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) }},
		{"data with EOF", func(b []byte) io.Reader { return iotest.DataErrReader(bytes.NewReader(b)) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Exactly n bytes: all of them, then a clean EOF.
			got, err := io.ReadAll(&limitReader{r: tt.r(data), n: n})
			if err != nil || !bytes.Equal(got, data) {
				t.Errorf("exactly n: %d bytes, err %v; want %d bytes and no error", len(got), err, n)
			}
			// Fewer than n: all of them, clean EOF.
			got, err = io.ReadAll(&limitReader{r: tt.r(data[:n-1]), n: n})
			if err != nil || !bytes.Equal(got, data[:n-1]) {
				t.Errorf("n-1: %d bytes, err %v", len(got), err)
			}
			// n+1: n bytes pass, then errLayerTooLarge, and it stays refused.
			lr := &limitReader{r: tt.r(append(append([]byte{}, data...), 'X')), n: n}
			got, err = io.ReadAll(lr)
			if !errors.Is(err, errLayerTooLarge) || !bytes.Equal(got, data) {
				t.Errorf("n+1: %d bytes, err %v; want %d bytes and errLayerTooLarge", len(got), err, n)
			}
		})
	}
	// A zero limit admits an empty stream only.
	if got, err := io.ReadAll(&limitReader{r: strings.NewReader(""), n: 0}); err != nil || len(got) != 0 {
		t.Errorf("empty with n=0: %q, %v", got, err)
	}
	if _, err := io.ReadAll(&limitReader{r: strings.NewReader("a"), n: 0}); !errors.Is(err, errLayerTooLarge) {
		t.Errorf("one byte with n=0: %v", err)
	}
	// A reader's own error passes through.
	boom := errors.New("boom")
	if _, err := io.ReadAll(&limitReader{r: iotest.ErrReader(boom), n: 10}); !errors.Is(err, boom) {
		t.Errorf("reader error: %v", err)
	}
}

func TestHeaderSink(t *testing.T) {
	body := append(append([]byte{}, wasmHeader...), "rest of the module"...)
	tests := []struct {
		name  string
		in    []byte
		piece int
		valid bool
	}{
		{"module whole", body, len(body), true},
		{"module byte by byte", body, 1, true},
		{"module in pieces of 3", body, 3, true},
		{"header only", wasmHeader, 8, true},
		{"seven bytes of header", wasmHeader[:7], 7, false},
		{"empty", nil, 1, false},
		{"wrong version", append([]byte{0, 'a', 's', 'm', 2, 0, 0, 0}, "x"...), 4, false},
		{"wrong magic", append([]byte{0, 'A', 'S', 'M', 1, 0, 0, 0}, "x"...), 100, false},
		{"text", []byte("(module)"), 100, false},
		{"component", append([]byte{0, 'a', 's', 'm', 0x0d, 0, 1, 0}, "x"...), 2, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var sink memSink
			hs := &headerSink{Sink: &sink, limit: 1 << 20}
			for i := 0; i < len(tt.in); i += tt.piece {
				end := min(i+tt.piece, len(tt.in))
				if n, err := hs.Write(tt.in[i:end]); err != nil || n != end-i {
					t.Fatalf("Write = %d, %v", n, err)
				}
			}
			if hs.valid() != tt.valid {
				t.Errorf("valid() = %v, want %v", hs.valid(), tt.valid)
			}
			if hs.n != int64(len(tt.in)) || !bytes.Equal(sink.buf.Bytes(), tt.in) {
				t.Errorf("n = %d, sink %q; want %d and the input", hs.n, sink.buf.Bytes(), len(tt.in))
			}
		})
	}
}

func TestHeaderSinkLimit(t *testing.T) {
	var sink memSink
	hs := &headerSink{Sink: &sink, limit: 20}
	if _, err := hs.Write(body20()[:12]); err != nil {
		t.Fatal(err)
	}
	if _, err := hs.Write(body20()[12:]); err != nil {
		t.Fatalf("exactly the limit: %v", err)
	}
	n, err := hs.Write([]byte{'!'})
	var se *sizeError
	if !errors.As(err, &se) || n != 0 {
		t.Fatalf("past the limit: %d, %v; want 0 and a *sizeError", n, err)
	}
	if se.limit != 20 || se.size != -1 || se.Error() != "the module is larger than the limit of 20 bytes" {
		t.Errorf("sizeError %+v: %q", *se, se.Error())
	}
	if hs.n != 20 || sink.buf.Len() != 20 {
		t.Errorf("after the refusal n = %d, sink %d bytes; want 20", hs.n, sink.buf.Len())
	}
	// A single write over the limit is refused whole.
	var sink2 memSink
	hs2 := &headerSink{Sink: &sink2, limit: 20}
	if _, err := hs2.Write(make([]byte, 21)); !errors.As(err, &se) || sink2.buf.Len() != 0 {
		t.Errorf("one write of 21: %v, sink %d bytes", err, sink2.buf.Len())
	}
}

func body20() []byte { return append(append([]byte{}, wasmHeader...), "123456789012"...) }

func TestHeaderSinkReset(t *testing.T) {
	var sink memSink
	hs := &headerSink{Sink: &sink, limit: 20}
	// A valid module, then Reset, then garbage: not valid.
	hs.Write(body20())
	if !hs.valid() {
		t.Fatal("not valid after a module")
	}
	if err := hs.Reset(); err != nil {
		t.Fatal(err)
	}
	if hs.valid() || hs.n != 0 || sink.resets != 1 || sink.buf.Len() != 0 {
		t.Fatalf("after Reset: valid %v n %d resets %d sink %d bytes", hs.valid(), hs.n, sink.resets, sink.buf.Len())
	}
	hs.Write([]byte("garbage!"))
	if hs.valid() {
		t.Error("garbage after Reset is valid")
	}
	// Garbage, Reset, a module: valid, and the limit counts from the Reset.
	hs.Reset()
	if _, err := hs.Write(body20()); err != nil {
		t.Fatalf("a module of the limit after Reset: %v", err)
	}
	if !hs.valid() || hs.n != 20 || !bytes.Equal(sink.buf.Bytes(), body20()) || sink.resets != 2 {
		t.Errorf("valid %v n %d sink %q resets %d", hs.valid(), hs.n, sink.buf.Bytes(), sink.resets)
	}
	// A short header after Reset does not keep the old one's bytes.
	hs.Reset()
	hs.Write(wasmHeader[:4])
	if hs.valid() {
		t.Error("four bytes after a Reset are valid")
	}
}
