package puller

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// Sink receives a module's bytes while they stream. Reset discards what was
// written so far (a better candidate came later in a tar).
type Sink interface {
	io.Writer
	Reset() error
}

// DigestSink is a Sink that hashes what it is given with sha256. For a raw
// Wasm layer the puller then checks the layer's digest against the sink's
// instead of hashing the bytes a second time.
type DigestSink interface {
	Sink
	Digest() digest.Digest
}

// errLayerTooLarge is returned by limitReader when a layer expands past its cap.
var errLayerTooLarge = errors.New("layer expands past its limit")

// limitReader fails, rather than stopping quietly, once more than n bytes
// were read: a decompression bomb is refused, not truncated.
type limitReader struct {
	r io.Reader
	n int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		// Allow a final read to observe a clean EOF.
		var one [1]byte
		n, err := l.r.Read(one[:])
		if n > 0 {
			return 0, errLayerTooLarge
		}
		return 0, err
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}

// decompress wraps r for the layer's compression, with at most maxOut bytes out.
// The returned close function releases decoder resources.
func decompress(r io.Reader, c Compression, maxOut int64) (io.Reader, func(), error) {
	switch c {
	case CompressionGzip:
		zr, err := gzip.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("layer is not the gzip it claims: %w", err)
		}
		zr.Multistream(true)
		return &limitReader{r: zr, n: maxOut}, func() { _ = zr.Close() }, nil
	case CompressionZstd:
		zr, err := zstd.NewReader(r,
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(32<<20))
		if err != nil {
			return nil, nil, fmt.Errorf("layer is not the zstd it claims: %w", err)
		}
		return &limitReader{r: zr, n: maxOut}, zr.Close, nil
	default:
		return &limitReader{r: r, n: maxOut}, func() {}, nil
	}
}

// tarCandidate ranks a tar entry: plugin.wasm beats any other *.wasm.
type tarCandidate int

const (
	notCandidate tarCandidate = iota
	otherWasm
	pluginWasm
)

func candidateOf(name string) tarCandidate {
	base := path.Base(name)
	switch {
	case base == "plugin.wasm":
		return pluginWasm
	case strings.HasSuffix(base, ".wasm") && base != ".wasm":
		return otherWasm
	}
	return notCandidate
}

// checkEntryName refuses names that would escape a root if unpacked: we never
// unpack, but such an image is hostile and is refused outright.
func checkEntryName(name string) error {
	if strings.HasPrefix(name, "/") {
		return fmt.Errorf("tar entry %q has an absolute name", name)
	}
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return fmt.Errorf("tar entry %q climbs out with ..", name)
		}
	}
	return nil
}

// extractFromTar streams the module out of a tar: the one regular file named
// plugin.wasm (by base name, at any depth), or else the only *.wasm file.
// Links, devices and escaping names are refused. Only the chosen file's bytes
// reach sink, at most maxModule of them. It returns the entry's name.
func extractFromTar(r io.Reader, sink Sink, maxModule int64, buf []byte) (string, error) {
	tr := tar.NewReader(r)
	var (
		chosen          string
		chosenRank      tarCandidate
		plugins, others int
	)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", fmt.Errorf("reading the layer's tar: %w", err)
		}
		if err := checkEntryName(hdr.Name); err != nil {
			return "", err
		}
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeRegA:
		case tar.TypeDir, tar.TypeXGlobalHeader:
			continue
		case tar.TypeSymlink, tar.TypeLink:
			return "", fmt.Errorf("tar entry %q is a link (to %q); links are refused", hdr.Name, hdr.Linkname)
		default:
			return "", fmt.Errorf("tar entry %q is not a regular file (type %q); refused", hdr.Name, hdr.Typeflag)
		}
		rank := candidateOf(hdr.Name)
		if rank == notCandidate {
			continue
		}
		if rank == pluginWasm {
			plugins++
		} else {
			others++
		}
		// Stream this entry only when it is the first of the best rank so far.
		if rank < chosenRank || (rank == chosenRank && chosen != "") {
			continue
		}
		if chosen != "" {
			if err := sink.Reset(); err != nil {
				return "", err
			}
		}
		if hdr.Size > maxModule {
			return "", &sizeError{what: "module " + hdr.Name, size: hdr.Size, limit: maxModule}
		}
		chosen, chosenRank = hdr.Name, rank
		if _, err := io.CopyBuffer(sink, tr, buf); err != nil {
			return "", fmt.Errorf("copying %s out of the layer: %w", hdr.Name, err)
		}
	}
	switch {
	case plugins == 1:
		return chosen, nil
	case plugins > 1:
		return "", fmt.Errorf("the layer holds %d files named plugin.wasm; exactly one is expected", plugins)
	case others == 1:
		return chosen, nil
	case others > 1:
		return "", fmt.Errorf("the layer holds %d *.wasm files and no plugin.wasm; name the module plugin.wasm", others)
	}
	return "", fmt.Errorf("the last layer holds no plugin.wasm and no *.wasm file")
}

// sizeError is a limit breach, mapped to errdefs.ErrTooLarge by the caller.
type sizeError struct {
	what        string
	size, limit int64
}

func (e *sizeError) Error() string {
	if e.size < 0 {
		return fmt.Sprintf("%s is larger than the limit of %d bytes", e.what, e.limit)
	}
	return fmt.Sprintf("%s is %d bytes, over the limit of %d bytes", e.what, e.size, e.limit)
}

// wasmHeader is the magic and version every Wasm 1.0 binary starts with.
var wasmHeader = []byte{0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00}

// headerSink checks the first eight bytes written are the Wasm magic and
// version, and counts and caps what passes to the underlying sink.
type headerSink struct {
	Sink
	head  [8]byte
	n     int64
	limit int64
}

func (h *headerSink) Write(p []byte) (int, error) {
	if h.n < int64(len(h.head)) {
		copy(h.head[h.n:], p)
	}
	if h.n+int64(len(p)) > h.limit {
		return 0, &sizeError{what: "the module", size: -1, limit: h.limit}
	}
	n, err := h.Sink.Write(p)
	h.n += int64(n)
	if err != nil {
		return n, &sinkError{err}
	}
	return n, nil
}

func (h *headerSink) Reset() error {
	h.n = 0
	h.head = [8]byte{}
	if err := h.Sink.Reset(); err != nil {
		return &sinkError{err}
	}
	return nil
}

// sinkError is a failure of the sink (the store: a full disk), not of the
// registry or the image: it is returned to the caller as the sink made it.
type sinkError struct{ err error }

func (e *sinkError) Error() string { return e.err.Error() }
func (e *sinkError) Unwrap() error { return e.err }

func (h *headerSink) valid() bool {
	return h.n >= int64(len(wasmHeader)) && bytes.Equal(h.head[:], wasmHeader)
}
