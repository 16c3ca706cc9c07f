package registrytest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/puller"
)

// Compression is how a container image layer's tar is compressed.
type Compression int

const (
	// Uncompressed is a plain tar (the zero value).
	Uncompressed Compression = iota
	// Gzip is tar+gzip.
	Gzip
	// Zstd is tar+zstd.
	Zstd
)

// String returns "tar", "tar+gzip" or "tar+zstd".
func (c Compression) String() string {
	switch c {
	case Uncompressed:
		return "tar"
	case Gzip:
		return "tar+gzip"
	case Zstd:
		return "tar+zstd"
	}
	return fmt.Sprintf("Compression(%d)", int(c))
}

// TarEntry is one entry of a layer's tar, written as given: no name, link or
// size is checked, so that hostile layers can be built.
type TarEntry struct {
	// Name is the entry's path in the archive, e.g. "plugin.wasm",
	// "usr/lib/x.wasm", "../../etc/passwd".
	Name string
	// Body is the data written after the header (even for types that have
	// none, if set).
	Body []byte
	// Type is the tar type flag (tar.TypeReg, tar.TypeSymlink, tar.TypeLink,
	// tar.TypeChar, tar.TypeDir, ...); 0 means tar.TypeReg.
	Type byte
	// Linkname is the target of a symlink or hard link.
	Linkname string
	// Size, when nonzero, is the size the header claims instead of
	// len(Body). The body written is still exactly Body, padded to the tar
	// block size, so a larger Size gives a truncated archive and a smaller
	// one puts body bytes where the next header should be.
	Size int64
	// Mode is the permission bits; 0 means 0644 (0755 for directories,
	// 0777 for symlinks).
	Mode int64
	// Devmajor and Devminor are the device numbers of char/block entries.
	Devmajor, Devminor int64
}

// Layer is one layer of an image pushed with PushContainerImage.
type Layer struct {
	// Entries are the tar entries, in order.
	Entries []TarEntry
	// Compression of the tar; it also picks the layer's media type.
	Compression Compression
	// Raw, when not nil, is pushed as the layer's bytes exactly, in place of
	// a tar built from Entries (e.g. garbage that claims to be tar+gzip).
	Raw []byte
	// MediaType, when set, replaces the media type derived from Compression
	// and the image kind.
	MediaType string
	// DiffID, when set, is written into the image config's rootfs.diff_ids
	// in place of the digest of the uncompressed tar.
	DiffID digest.Digest
}

// tarSource is one entry to stream into a tar: the header and a reader for
// exactly bodyLen bytes of body.
type tarSource struct {
	hdr     tar.Header
	body    io.Reader
	bodyLen int64
}

func fixedTime() time.Time { return time.Date(2025, time.January, 1, 0, 0, 0, 0, time.UTC) }

func (e TarEntry) source() tarSource {
	typ := e.Type
	if typ == 0 {
		typ = tar.TypeReg
	}
	mode := e.Mode
	if mode == 0 {
		switch typ {
		case tar.TypeDir:
			mode = 0o755
		case tar.TypeSymlink:
			mode = 0o777
		default:
			mode = 0o644
		}
	}
	size := e.Size
	if size == 0 {
		size = int64(len(e.Body))
	}
	return tarSource{
		hdr: tar.Header{
			Typeflag: typ,
			Name:     e.Name,
			Linkname: e.Linkname,
			Size:     size,
			Mode:     mode,
			ModTime:  fixedTime(),
			Devmajor: e.Devmajor,
			Devminor: e.Devminor,
		},
		body:    bytes.NewReader(e.Body),
		bodyLen: int64(len(e.Body)),
	}
}

// fileEntry is the single regular file a "FROM scratch, COPY" image holds.
func fileEntry(name string, body io.Reader, size int64) tarSource {
	return tarSource{
		hdr: tar.Header{
			Typeflag: tar.TypeReg,
			Name:     name,
			Size:     size,
			Mode:     0o644,
			ModTime:  fixedTime(),
		},
		body:    body,
		bodyLen: size,
	}
}

// writeTar writes entries to w. The headers come from archive/tar, the
// bodies are written by hand so that a header may claim another size than
// the body has. For honest entries the output is what tar.Writer writes.
func writeTar(w io.Writer, entries []tarSource) error {
	const block = 512
	var zeros [2 * block]byte
	for _, e := range entries {
		// A fresh tar.Writer per entry emits the header block(s) (with any
		// PAX/GNU extension records) right away; it is never flushed, so it
		// never checks the body against the header's size.
		hdr := e.hdr
		if err := tar.NewWriter(w).WriteHeader(&hdr); err != nil {
			return fmt.Errorf("registrytest: writing tar header for %q: %w", e.hdr.Name, err)
		}
		n, err := io.CopyN(w, e.body, e.bodyLen)
		if err != nil {
			return fmt.Errorf("registrytest: writing tar body of %q (%d of %d bytes): %w", e.hdr.Name, n, e.bodyLen, err)
		}
		if pad := (block - n%block) % block; pad > 0 {
			if _, err := w.Write(zeros[:pad]); err != nil {
				return fmt.Errorf("registrytest: padding tar body of %q: %w", e.hdr.Name, err)
			}
		}
	}
	if _, err := w.Write(zeros[:]); err != nil {
		return fmt.Errorf("registrytest: writing tar trailer: %w", err)
	}
	return nil
}

// writeLayer writes the tar of entries, compressed as c, to w and returns
// the digest of the uncompressed tar (the diff ID).
func writeLayer(w io.Writer, c Compression, entries []tarSource) (digest.Digest, error) {
	diff := digest.SHA256.Digester()
	var (
		cw  io.Writer
		fin func() error
	)
	switch c {
	case Uncompressed:
		cw, fin = w, func() error { return nil }
	case Gzip:
		gw := gzip.NewWriter(w)
		cw, fin = gw, gw.Close
	case Zstd:
		zw, err := zstd.NewWriter(w, zstd.WithEncoderConcurrency(1))
		if err != nil {
			return "", fmt.Errorf("registrytest: starting zstd: %w", err)
		}
		cw, fin = zw, zw.Close
	default:
		return "", fmt.Errorf("registrytest: unknown compression %v", c)
	}
	if err := writeTar(io.MultiWriter(cw, diff.Hash()), entries); err != nil {
		return "", err
	}
	if err := fin(); err != nil {
		return "", fmt.Errorf("registrytest: finishing %v layer: %w", c, err)
	}
	return diff.Digest(), nil
}

// rawDiffID is the diff ID of a layer given as raw bytes: the digest of its
// decompressed content when it decompresses as c, else of the bytes.
func rawDiffID(raw []byte, c Compression) digest.Digest {
	var r io.Reader
	switch c {
	case Gzip:
		gr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return digest.FromBytes(raw)
		}
		defer gr.Close()
		r = gr
	case Zstd:
		zr, err := zstd.NewReader(bytes.NewReader(raw))
		if err != nil {
			return digest.FromBytes(raw)
		}
		defer zr.Close()
		r = zr
	default:
		return digest.FromBytes(raw)
	}
	d := digest.SHA256.Digester()
	if _, err := io.Copy(d.Hash(), r); err != nil {
		return digest.FromBytes(raw)
	}
	return d.Digest()
}

// layerMediaType is the media type of a layer compressed as c in a Docker
// or an OCI image.
func layerMediaType(c Compression, docker bool) (string, error) {
	switch {
	case c == Uncompressed && docker:
		return puller.MediaTypeDockerLayerTar, nil
	case c == Gzip && docker:
		return puller.MediaTypeDockerLayerGzip, nil
	case c == Zstd && docker:
		return puller.MediaTypeDockerLayerZstd, nil
	case c == Uncompressed:
		return puller.MediaTypeOCILayerTar, nil
	case c == Gzip:
		return puller.MediaTypeOCILayerGzip, nil
	case c == Zstd:
		return puller.MediaTypeOCILayerZstd, nil
	}
	return "", fmt.Errorf("registrytest: unknown compression %v", c)
}
