// Command mkimage assembles static binaries into a single-layer OCI image
// and writes it as an OCI image-layout tarball, which `ctr images import`,
// `docker load` (with the index) and `skopeo copy oci-archive:` accept. It
// exists because these machines have no Docker engine; with one, the
// Dockerfile in cmd/wasm-csi-driver builds the same image.
//
//	mkimage -o bin/image.tar -name ghcr.io/wasm-csi/wasm-csi-driver:dev \
//	  -entrypoint /wasm-csi-driver bin/wasm-csi-driver=/wasm-csi-driver
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	_ "crypto/sha256" // registers sha256 for go-digest
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content/oci"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, " ") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	out := fs.String("o", "", "output tarball (OCI image layout)")
	name := fs.String("name", "", "image name with tag, e.g. registry.local/wasm-csi-driver:dev")
	var entrypoint, env stringList
	fs.Var(&entrypoint, "entrypoint", "entrypoint argument (repeatable, in order)")
	fs.Var(&env, "env", "KEY=VALUE in the image config (repeatable)")
	arch := fs.String("arch", "amd64", "image architecture")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" || *name == "" || fs.NArg() == 0 {
		return errors.New("usage: mkimage -o OUT.tar -name NAME:TAG [-entrypoint ARG]... SRC=/PATH...")
	}
	layer, diffID, err := buildLayer(fs.Args())
	if err != nil {
		return err
	}
	cfg := ocispec.Image{
		Created:  ptr(time.Unix(0, 0).UTC()),
		Platform: ocispec.Platform{OS: "linux", Architecture: *arch},
		Config:   ocispec.ImageConfig{Entrypoint: entrypoint, Env: env},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}},
	}
	cfgBytes, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "mkimage-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	store, err := oci.New(dir)
	if err != nil {
		return err
	}
	ctx := context.Background()
	layerDesc := push(ctx, store, ocispec.MediaTypeImageLayerGzip, layer, &err)
	cfgDesc := push(ctx, store, ocispec.MediaTypeImageConfig, cfgBytes, &err)
	if err != nil {
		return err
	}
	man := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    cfgDesc,
		Layers:    []ocispec.Descriptor{layerDesc},
	}
	manBytes, err := json.Marshal(man)
	if err != nil {
		return err
	}
	manDesc := push(ctx, store, ocispec.MediaTypeImageManifest, manBytes, &err)
	if err != nil {
		return err
	}
	if err := store.Tag(ctx, manDesc, *name); err != nil {
		return err
	}
	// containerd names an imported image by this annotation on the index entry.
	if err := annotateIndex(filepath.Join(dir, "index.json"), *name); err != nil {
		return err
	}
	if err := tarDir(dir, *out); err != nil {
		return err
	}
	fmt.Printf("%s %s -> %s\n", *name, manDesc.Digest, *out)
	return nil
}

func ptr[T any](v T) *T { return &v }

func push(ctx context.Context, store *oci.Store, mediaType string, data []byte, errp *error) ocispec.Descriptor {
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))}
	if *errp != nil {
		return desc
	}
	if err := store.Push(ctx, desc, bytes.NewReader(data)); err != nil {
		*errp = err
	}
	return desc
}

// buildLayer makes a gzip tar of SRC=/DEST files (mode 0755, root owned,
// fixed times) and returns it with the uncompressed tar's digest.
func buildLayer(files []string) ([]byte, digest.Digest, error) {
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	dirs := map[string]bool{}
	for _, f := range files {
		src, dst, ok := strings.Cut(f, "=")
		if !ok || !strings.HasPrefix(dst, "/") {
			return nil, "", fmt.Errorf("%q is not SRC=/DEST", f)
		}
		data, err := os.ReadFile(src)
		if err != nil {
			return nil, "", err
		}
		rel := strings.TrimPrefix(dst, "/")
		for d := filepath.Dir(rel); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
				return nil, "", err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: 0o755, Size: int64(len(data)), ModTime: time.Unix(0, 0)}); err != nil {
			return nil, "", err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, "", err
		}
	}
	// An empty /tmp, for programs that write temp files.
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "tmp/", Mode: 0o1777, ModTime: time.Unix(0, 0)}); err != nil {
		return nil, "", err
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}
	diffID := digest.FromBytes(raw.Bytes())
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	return gz.Bytes(), diffID, nil
}

func annotateIndex(path, name string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return err
	}
	for i := range idx.Manifests {
		if idx.Manifests[i].Annotations == nil {
			idx.Manifests[i].Annotations = map[string]string{}
		}
		idx.Manifests[i].Annotations["io.containerd.image.name"] = name
		idx.Manifests[i].Annotations[ocispec.AnnotationRefName] = name
	}
	b, err = json.Marshal(idx)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// tarDir writes dir's files into a tarball at out, paths relative to dir.
func tarDir(dir, out string) error {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if d.IsDir() {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		src, err := os.Open(p)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.Copy(tw, src)
		return err
	})
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Sync()
}
