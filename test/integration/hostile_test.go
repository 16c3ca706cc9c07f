package integration

import (
	"archive/tar"
	"bytes"
	"compress/flate"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"oras.land/oras-go/v2/content"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// hostileCase is one hostile image: how to push it to ref (an image of the
// hostile registry, by its own address), and how the daemon must refuse it.
type hostileCase struct {
	name  string
	push  func(t *testing.T, ref string)
	code  codes.Code
	words []string // besides the image, the message says this
	// after, if set, checks what the registry served.
	after func(t *testing.T)
}

// TestHostileImages publishes hostile images to one daemon (modules capped
// at 1 MiB by its config file). Each is refused with the code and the words
// of its case and a message naming the image; nothing is mounted, and
// nothing is written anywhere in the test's temp tree (kubelet's pods
// directory, the store, a sentinel directory the hostile tar names point
// at), nor to the host files the links point to. The cases run in turn, so
// each snapshot sees one publish only.
func TestHostileImages(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	ctx := context.Background()
	hostile := registrytest.StartT(t, registrytest.Options{})
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfgPath, "limits:\n  maxModuleSize: 1Mi\n")
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + hostile.ProxyHost(), "--config=" + cfgPath}})
	tree := filepath.Dir(e.k.Root) // the test's temp tree: kubelet, daemon, store, config, sentinel
	sentinel := t.TempDir()
	if !strings.HasPrefix(sentinel, tree+string(filepath.Separator)) {
		t.Fatalf("the sentinel directory %s is not in the test's temp tree %s", sentinel, tree)
	}
	// A name with enough .. to climb from any working directory to / and
	// then down into the sentinel directory, were it ever unpacked.
	climb := strings.Repeat("../", 32) + strings.TrimPrefix(sentinel, "/")
	good := func(t *testing.T) registrytest.TarEntry {
		return registrytest.TarEntry{Name: "plugin.wasm", Body: module(t, "good")}
	}
	containerImage := func(t *testing.T, layers []registrytest.Layer, opts ...registrytest.PushOption) func(*testing.T, string) {
		return func(t *testing.T, ref string) {
			t.Helper()
			if _, err := registrytest.PushContainerImage(ctx, ref, layers, opts...); err != nil {
				t.Fatal(err)
			}
		}
	}
	tarImage := func(t *testing.T, entries ...registrytest.TarEntry) func(*testing.T, string) {
		return containerImage(t, []registrytest.Layer{{Entries: entries, Compression: registrytest.Gzip}})
	}
	artifact := func(a registrytest.Artifact) func(*testing.T, string) {
		return func(t *testing.T, ref string) {
			t.Helper()
			if _, err := registrytest.PushArtifact(ctx, ref, a); err != nil {
				t.Fatal(err)
			}
		}
	}
	wasm := func(mod []byte, layout registrytest.Layout) func(*testing.T, string) {
		return func(t *testing.T, ref string) {
			t.Helper()
			if _, err := registrytest.PushWasm(ctx, ref, mod, layout); err != nil {
				t.Fatal(err)
			}
		}
	}
	fp := codes.FailedPrecondition
	big := wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name() + " 2MiB", PadTo: 2 << 20})
	bigInTar := wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name() + " 2MiB in a tar", PadTo: 2 << 20})
	notGzip := append([]byte{0x1f, 0x8b}, wasmgen.Garbage(4096)...) // gzip's magic, then garbage
	var bigTarLayer, bigTarConfig, bigConfigDigest digest.Digest
	bigConfig := bytes.Repeat([]byte(" "), 5<<20) // valid JSON whitespace, then {}
	bigConfig = append(bigConfig, "{}"...)

	cases := []hostileCase{
		// Names that would escape a root if unpacked; a good plugin.wasm
		// beside each, so the name alone is the reason.
		{name: "dotdot-name", code: fp, words: []string{"climbs out with ..", climb + "/dotdot.wasm"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: climb + "/dotdot.wasm", Body: module(t, "dotdot")}, good(t))(t, ref)
			}},
		{name: "dotdot-inside-name", code: fp, words: []string{"climbs out with ..", "filters/../../plugin.wasm"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: "filters/../../plugin.wasm", Body: module(t, "dotdot-inside")})(t, ref)
			}},
		{name: "absolute-name", code: fp, words: []string{"absolute name", sentinel + "/absolute.wasm"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: sentinel + "/absolute.wasm", Body: module(t, "absolute")}, good(t))(t, ref)
			}},
		// Links: a symlink named plugin.wasm to a host secret, one beside a
		// good module, and hard links.
		{name: "symlink-plugin-to-etc-passwd", code: fp, words: []string{"plugin.wasm", "is a link", "/etc/passwd", "refused"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: "plugin.wasm", Type: tar.TypeSymlink, Linkname: "/etc/passwd"})(t, ref)
			}},
		{name: "symlink-beside-module", code: fp, words: []string{"lib/escape", "is a link", sentinel},
			push: func(t *testing.T, ref string) {
				tarImage(t, good(t), registrytest.TarEntry{Name: "lib/escape", Type: tar.TypeSymlink, Linkname: sentinel})(t, ref)
			}},
		{name: "hardlink-plugin-to-etc-shadow", code: fp, words: []string{"plugin.wasm", "is a link", "/etc/shadow"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: "plugin.wasm", Type: tar.TypeLink, Linkname: "/etc/shadow"})(t, ref)
			}},
		{name: "hardlink-to-module", code: fp, words: []string{"copy.wasm", "is a link"},
			push: func(t *testing.T, ref string) {
				tarImage(t, good(t), registrytest.TarEntry{Name: "copy.wasm", Type: tar.TypeLink, Linkname: "plugin.wasm"})(t, ref)
			}},
		// Device files and a fifo.
		{name: "char-device", code: fp, words: []string{"dev/mem", "not a regular file"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: "dev/mem", Type: tar.TypeChar, Devmajor: 1, Devminor: 1}, good(t))(t, ref)
			}},
		{name: "char-device-named-plugin", code: fp, words: []string{"plugin.wasm", "not a regular file"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: "plugin.wasm", Type: tar.TypeChar, Devmajor: 1, Devminor: 3})(t, ref)
			}},
		{name: "block-device", code: fp, words: []string{"dev/sda", "not a regular file"},
			push: func(t *testing.T, ref string) {
				tarImage(t, good(t), registrytest.TarEntry{Name: "dev/sda", Type: tar.TypeBlock, Devmajor: 8})(t, ref)
			}},
		{name: "fifo", code: fp, words: []string{"run/fifo", "not a regular file"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: "run/fifo", Type: tar.TypeFifo}, good(t))(t, ref)
			}},
		// Ambiguity and emptiness.
		{name: "several-candidates-no-plugin-wasm", code: fp, words: []string{"3 *.wasm files and no plugin.wasm"},
			push: func(t *testing.T, ref string) {
				tarImage(t,
					registrytest.TarEntry{Name: "a.wasm", Body: module(t, "a")},
					registrytest.TarEntry{Name: "lib/b.wasm", Body: module(t, "b")},
					registrytest.TarEntry{Name: "c.wasm", Body: module(t, "c")})(t, ref)
			}},
		{name: "empty-image", code: fp, words: []string{"no layers"},
			push: func(t *testing.T, ref string) { containerImage(t, nil)(t, ref) }},
		{name: "empty-artifact", code: fp, words: []string{"no layers"},
			push: artifact(registrytest.Artifact{ArtifactType: "application/vnd.wasm.config.v0+json",
				Config: &registrytest.Blob{MediaType: puller.MediaTypeWasmConfigV0, Data: []byte("{}")}})},
		{name: "empty-tar-layer", code: fp, words: []string{"no plugin.wasm and no *.wasm"},
			push: func(t *testing.T, ref string) {
				containerImage(t, []registrytest.Layer{{Compression: registrytest.Uncompressed}})(t, ref)
			}},
		{name: "zero-byte-tar-layer", code: fp, words: []string{"no plugin.wasm and no *.wasm"},
			push: func(t *testing.T, ref string) {
				containerImage(t, []registrytest.Layer{{Raw: []byte{}, MediaType: puller.MediaTypeOCILayerTar}})(t, ref)
			}},
		// Layers that are not the compression they claim; their digests
		// match, so it is the image's fault, not the registry's.
		{name: "garbage-claims-gzip", code: fp, words: []string{"not the gzip it claims"},
			push: func(t *testing.T, ref string) {
				containerImage(t, []registrytest.Layer{{Raw: wasmgen.Garbage(4096), Compression: registrytest.Gzip}})(t, ref)
			}},
		{name: "gzip-magic-then-garbage", code: fp, words: []string{"not the gzip it claims"},
			push: func(t *testing.T, ref string) {
				containerImage(t, []registrytest.Layer{{Raw: notGzip, MediaType: puller.MediaTypeDockerLayerGzip}}, registrytest.WithDockerMediaTypes())(t, ref)
			}},
		{name: "zero-byte-gzip-layer", code: fp, words: []string{"not the gzip it claims"},
			push: func(t *testing.T, ref string) {
				containerImage(t, []registrytest.Layer{{Raw: []byte{}, Compression: registrytest.Gzip}})(t, ref)
			}},
		{name: "garbage-claims-zstd", code: fp, words: []string{"cannot take the module out of layer"},
			push: func(t *testing.T, ref string) {
				containerImage(t, []registrytest.Layer{{Raw: wasmgen.Garbage(4096), Compression: registrytest.Zstd}})(t, ref)
			}},
		{name: "tar-entry-longer-than-layer", code: fp, words: []string{"plugin.wasm", "out of the layer"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: "plugin.wasm", Body: module(t, "short"), Size: 64 << 10})(t, ref)
			}},
		// Modules that are not Wasm binaries.
		{name: "module-without-magic", code: fp, words: []string{"Wasm magic and version"},
			push: wasm(append([]byte("#!/bin/sh\nrm -rf /\n"), wasmgen.Garbage(100)...), registrytest.LayoutCNCF)},
		{name: "module-without-magic-in-tar", code: fp, words: []string{"Wasm magic and version"},
			push: func(t *testing.T, ref string) {
				tarImage(t, registrytest.TarEntry{Name: "plugin.wasm", Body: []byte("\x7fELF\x02\x01\x01\x00 not a wasm module")})(t, ref)
			}},
		{name: "wasm-version-2", code: fp, words: []string{"Wasm magic and version"},
			push: wasm(append([]byte("\x00asm\x02\x00\x00\x00"), module(t, "v2")[8:]...), registrytest.LayoutWasmToOCI)},
		{name: "module-shorter-than-header", code: fp, words: []string{"Wasm magic and version"},
			push: wasm([]byte("\x00asm"), registrytest.LayoutSolo)},
		// Unknown media types.
		{name: "unknown-layer-media-type", code: fp, words: []string{"application/vnd.acme.filter.v1+bin"},
			push: artifact(registrytest.Artifact{ArtifactType: "application/vnd.acme.filter.v1",
				Layers: []registrytest.Blob{{MediaType: "application/vnd.acme.filter.v1+bin", Data: module(t, "acme")}}})},
		{name: "unknown-config-media-type", code: fp, words: []string{"not a container image", "application/vnd.acme.config.v1+json"},
			push: func(t *testing.T, ref string) {
				containerImage(t, []registrytest.Layer{{Entries: []registrytest.TarEntry{good(t)}, Compression: registrytest.Gzip}},
					registrytest.WithConfig(registrytest.Blob{MediaType: "application/vnd.acme.config.v1+json", Data: []byte("{}")}))(t, ref)
			}},
		{name: "unknown-last-layer-media-type", code: fp, words: []string{"neither Wasm nor a tar", "application/vnd.acme.layer.v1.tar+lz4"},
			push: func(t *testing.T, ref string) {
				containerImage(t, []registrytest.Layer{{Entries: []registrytest.TarEntry{good(t)}, Compression: registrytest.Gzip},
					{Raw: []byte("lz4 frames"), MediaType: "application/vnd.acme.layer.v1.tar+lz4"}})(t, ref)
			}},
		{name: "two-wasm-layers", code: fp, words: []string{"2 Wasm module layers"},
			push: artifact(registrytest.Artifact{ArtifactType: puller.MediaTypeWasmConfigV0, Layers: []registrytest.Blob{
				{MediaType: puller.MediaTypeWasmLayer, Data: module(t, "layer 1")},
				{MediaType: puller.MediaTypeWasmLayer, Data: module(t, "layer 2")}}})},
		// Indexes nested deeper than the driver follows: the only loop
		// content addressing allows is a chain, since an index cannot hold
		// its own digest (see TestHostileManifests for the cap on sizes).
		{name: "nested-indexes", code: fp, words: []string{"image index nests more than"},
			push: func(t *testing.T, ref string) {
				repo := strings.TrimSuffix(ref, ":1")
				desc, err := registrytest.PushWasm(ctx, repo+":module", module(t, "indexed"), registrytest.LayoutCNCF)
				if err != nil {
					t.Fatal(err)
				}
				for i := 1; i <= 3; i++ {
					tag := fmt.Sprintf("%s:index-%d", repo, i)
					if i == 3 {
						tag = ref
					}
					if desc, err = registrytest.PushIndex(ctx, tag, []registrytest.IndexEntry{{Descriptor: desc,
						Platform: &ocispec.Platform{OS: "wasip1", Architecture: "wasm"}}}); err != nil {
						t.Fatal(err)
					}
				}
			}},
		// A config blob larger than any image's: refused from the
		// manifest's descriptor, never downloaded.
		{name: "config-over-cap", code: fp, words: []string{"config", "over the limit"},
			push: func(t *testing.T, ref string) {
				desc, err := registrytest.PushContainerImage(ctx, ref, []registrytest.Layer{{Entries: []registrytest.TarEntry{good(t)}}},
					registrytest.WithConfig(registrytest.Blob{Data: bigConfig}))
				if err != nil {
					t.Fatal(err)
				}
				bigConfigDigest, _ = manifestBlobsAt(t, ref, desc)
			},
			after: func(t *testing.T) {
				if n := hostile.BlobGets(bigConfigDigest); n != 0 {
					t.Errorf("the %d-byte config was downloaded %d times", len(bigConfig), n)
				}
			}},
		// Modules over limits.maxModuleSize (1Mi here): a raw layer is
		// refused from its descriptor, before any download; a tar's
		// module once its entry's header is read.
		{name: "module-over-limit-raw", code: fp, words: []string{"over the limit", "maxModuleSize"},
			push: wasm(big, registrytest.LayoutCNCF),
			after: func(t *testing.T) {
				if n := hostile.BlobGets(digest.FromBytes(big)); n != 0 {
					t.Errorf("a raw module over the limit was downloaded %d times; its size is in the manifest", n)
				}
			}},
		{name: "module-over-limit-tar", code: fp, words: []string{"plugin.wasm", "over the limit", "maxModuleSize"},
			push: func(t *testing.T, ref string) {
				desc, err := registrytest.PushWasm(ctx, ref, bigInTar, registrytest.LayoutOCITar)
				if err != nil {
					t.Fatal(err)
				}
				var layers []digest.Digest
				bigTarConfig, layers = manifestBlobsAt(t, ref, desc)
				bigTarLayer = layers[len(layers)-1]
			},
			after: func(t *testing.T) {
				if n := hostile.BlobGets(bigTarLayer); n > 1 {
					t.Errorf("the layer was downloaded %d times", n)
				}
				if n := hostile.BlobGets(bigTarConfig); n != 0 {
					t.Errorf("the config was downloaded %d times", n)
				}
			}},
	}

	passwd := hostStat(t, "/etc/passwd", "/etc/shadow")
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			repo := fmt.Sprintf("hostile/%02d-%s", i, c.name)
			c.push(t, hostile.Host()+"/"+repo+":1")
			img := hostile.ProxyHost() + "/" + repo + ":1"
			hostileRefused(t, e, tree, img, c.code, c.words...)
			if c.after != nil {
				c.after(t)
			}
		})
	}
	if got := e.storedBlobs(); len(got) != 0 {
		t.Errorf("the store holds %v after hostile images only", got)
	}
	if after := hostStat(t, "/etc/passwd", "/etc/shadow"); after != passwd {
		t.Errorf("host files changed: %s, was %s", after, passwd)
	}
	if got := hostileTree(t, sentinel); len(got) != 0 {
		t.Errorf("files appeared in the sentinel directory: %v", got)
	}
}

// TestHostileManifests: a manifest over the 4 MiB cap is refused from the
// size the registry announces, before its body is asked for. The test
// registry (distribution v3) refuses manifest PUTs over 4 MiB itself (400,
// "request body too large"; logged below), the same as the cap, so no
// manifest it stores exceeds it. A hostile registry is bound by nothing,
// and the proxy plays one: it serves a 5 MiB manifest (5000 annotations on
// a valid image, so the size is the only fault) whose digest is right.
func TestHostileManifests(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	ctx := context.Background()
	hostile := registrytest.StartT(t, registrytest.Options{})
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + hostile.ProxyHost()}})
	tree := filepath.Dir(e.k.Root)

	mod := module(t, "1")
	desc, err := registrytest.PushWasm(ctx, hostile.Host()+"/hostile/big-manifest:small", mod, registrytest.LayoutCNCF)
	if err != nil {
		t.Fatal(err)
	}
	_, layers := manifestBlobsAt(t, hostile.Host()+"/hostile/big-manifest:small", desc)
	var m ocispec.Manifest
	r, err := registrytest.Repository(hostile.Host() + "/hostile/big-manifest")
	if err != nil {
		t.Fatal(err)
	}
	small, err := content.FetchAll(ctx, r, desc)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(small, &m); err != nil {
		t.Fatal(err)
	}
	m.Annotations = map[string]string{}
	filler := strings.Repeat("x", 1000)
	for i := 0; i < 5000; i++ {
		m.Annotations[fmt.Sprintf("dev.wasm-csi.hostile.%05d", i)] = filler
	}
	big, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if len(big) <= puller.DefaultMaxManifestSize {
		t.Fatalf("the manifest is %d bytes, not over the cap", len(big))
	}
	bigDigest := digest.FromBytes(big)
	// What the registry says to a PUT of it (oras-go would not even send
	// it: its client refuses manifests over 4 MiB too).
	put, err := http.NewRequestWithContext(ctx, http.MethodPut, "http://"+hostile.Host()+"/v2/hostile/big-manifest/manifests/refused", bytes.NewReader(big))
	if err != nil {
		t.Fatal(err)
	}
	put.Header.Set("Content-Type", puller.MediaTypeOCIManifest)
	if resp, err := http.DefaultClient.Do(put); err != nil {
		t.Logf("PUT of a %d-byte manifest: %v", len(big), err)
	} else {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		t.Logf("PUT of a %d-byte manifest: %s %s", len(big), resp.Status, bytes.TrimSpace(body))
	}
	hostile.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch r.URL.Path {
			case "/v2/hostile/big-manifest/manifests/1", "/v2/hostile/big-manifest/manifests/" + bigDigest.String():
				w.Header().Set("Content-Type", puller.MediaTypeOCIManifest)
				w.Header().Set("Docker-Content-Digest", bigDigest.String())
				w.Header().Set("Docker-Distribution-Api-Version", "registry/2.0")
				w.Header().Set("Content-Length", strconv.Itoa(len(big)))
				if r.Method == http.MethodGet {
					_, _ = w.Write(big)
				}
				return
			}
			next.ServeHTTP(w, r)
		})
	})
	t.Cleanup(func() { hostile.SetInterceptor(nil) })

	for _, ref := range []string{"hostile/big-manifest:1", "hostile/big-manifest@" + bigDigest.String()} {
		img := hostile.ProxyHost() + "/" + ref
		hostileRefused(t, e, tree, img, codes.FailedPrecondition, "manifest", "over the limit")
	}
	c := hostile.Counts()
	if n := c.ManifestGets["hostile/big-manifest:1"] + c.ManifestGets["hostile/big-manifest@"+bigDigest.String()]; n != 0 {
		t.Errorf("the %d-byte manifest was downloaded %d times; its size was announced", len(big), n)
	}
	if n := hostile.BlobGets(layers[0]); n != 0 {
		t.Errorf("the module was downloaded %d times", n)
	}
	// The same image with a manifest under the cap publishes: the size was
	// the only fault.
	req := e.mustPublish(hostile.ProxyHost()+"/hostile/big-manifest:small", nil)
	checkFile(t, req, "plugin.wasm", mod)
	e.mustUnpublish(req)
}

// TestHostileDecompressionBomb: 2 GiB of zeros in a 2 MiB gzip and in a
// 64 KiB zstd layer (a tar holding one file of zeros, beside nothing else)
// are refused once they expand past the layer's limit, and the daemon's
// peak memory stays flat. The limit is twice limits.maxModuleSize plus
// 16 MiB: 80 MiB here, more than the growth allowed, so a daemon that
// buffered what it decompressed would fail.
func TestHostileDecompressionBomb(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	ctx := context.Background()
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfgPath, "limits:\n  maxModuleSize: 32Mi\n")
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.ProxyHost(), "--config=" + cfgPath}})
	tree := filepath.Dir(e.k.Root)
	const zeros = 2 << 30
	const maxGrowth = 64 << 20

	// Warm up: one publish of each compression, so the peak below counts
	// only what a bomb adds.
	for _, layout := range []registrytest.Layout{registrytest.LayoutOCIGzip, registrytest.LayoutOCIZstd} {
		repo := repoName(t, "warm-"+layout.String())
		mod := module(t, layout.String())
		push(t, repo+":1", mod, layout)
		req := e.mustPublish(image(repo+":1"), nil)
		checkFile(t, req, "plugin.wasm", mod)
		e.mustUnpublish(req)
	}
	before := vmHWM(t, e.d.Pid())

	start := time.Now()
	bombs := []struct {
		name      string
		data      []byte
		mediaType string
	}{
		{"gzip", gzipZerosTar(zeros), puller.MediaTypeOCILayerGzip},
		{"zstd", zstdZerosTar(zeros), puller.MediaTypeOCILayerZstd},
	}
	t.Logf("built the bombs in %v", time.Since(start))
	for _, b := range bombs {
		t.Run(b.name, func(t *testing.T) {
			repo := repoName(t, "bomb")
			if _, err := registrytest.PushContainerImage(ctx, reg.Host()+"/"+repo+":1", []registrytest.Layer{{
				Raw: b.data, MediaType: b.mediaType,
				// Set, so the pusher does not decompress 2 GiB for it.
				DiffID: digest.FromString(b.name + " bomb"),
			}}); err != nil {
				t.Fatal(err)
			}
			img := image(repo + ":1")
			start := time.Now()
			hostileRefused(t, e, tree, img, codes.FailedPrecondition, "expands past", "decompression bomb")
			peak := vmHWM(t, e.d.Pid())
			t.Logf("%d bytes of %s holding %d bytes of zeros refused in %v; peak RSS %d MiB, %d MiB before the bombs",
				len(b.data), b.name, zeros, time.Since(start), peak>>20, before>>20)
			if peak-before > maxGrowth {
				t.Errorf("the daemon's peak RSS grew by %d MiB (from %d MiB), more than %d MiB", (peak-before)>>20, before>>20, maxGrowth>>20)
			}
		})
	}
	if got := e.storedBlobs(); len(got) != 2 {
		t.Errorf("the store holds %v, want the two warm-up modules only", got)
	}
}

// hostileRefused publishes img for a new pod and checks it is refused with
// code and a message naming img and holding words; that nothing is mounted
// at the target, which does not exist; and that nothing changed in tree,
// the test's temp tree, but the store's own records.
func hostileRefused(t *testing.T, e *env, tree, img string, code codes.Code, words ...string) {
	t.Helper()
	req := e.request(harness.NewPod("hostile"), "filter", map[string]string{"image": img})
	before := hostileTree(t, tree)
	wantCode(t, e.publish(req), code, append([]string{img}, words...)...)
	checkGone(t, req.TargetPath)
	after := hostileTree(t, tree)
	store := e.d.Root + string(filepath.Separator)
	for p, st := range after {
		if strings.HasPrefix(filepath.Base(p), ".tmp-") {
			t.Errorf("temp file %s left behind", p)
			continue
		}
		if was, ok := before[p]; ok && was.same(st) {
			continue
		}
		rel := strings.TrimPrefix(p, store)
		if rel != p && (filepath.Dir(rel) == "refs" || filepath.Dir(rel) == "volumes") && strings.HasSuffix(rel, ".json") {
			continue // the store's own records
		}
		t.Errorf("%s was written by a refused publish (%v)", p, st)
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			t.Errorf("%s was removed by a refused publish", p)
		}
	}
}

// treeEntry is what a snapshot keeps of a file: enough to see it change.
type treeEntry struct {
	mode  fs.FileMode
	size  int64
	mtime time.Time
	link  string
}

// same reports whether e and o are the same file, unchanged. A directory
// is the same whatever its entries: they are compared one by one.
func (e treeEntry) same(o treeEntry) bool {
	if e.mode.IsDir() {
		return o.mode.IsDir()
	}
	return e.mode == o.mode && e.size == o.size && e.mtime.Equal(o.mtime) && e.link == o.link
}

// hostileTree snapshots every file under root (links not followed).
func hostileTree(t *testing.T, root string) map[string]treeEntry {
	t.Helper()
	out := map[string]treeEntry{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil // removed while walking (a temp file)
			}
			return err
		}
		if p == root {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		en := treeEntry{mode: fi.Mode(), size: fi.Size(), mtime: fi.ModTime()}
		if fi.Mode()&fs.ModeSymlink != 0 {
			en.link, _ = os.Readlink(p)
		}
		out[p] = en
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// hostStat describes host files, to see them change.
func hostStat(t *testing.T, paths ...string) string {
	t.Helper()
	var parts []string
	for _, p := range paths {
		fi, err := os.Lstat(p)
		if err != nil {
			parts = append(parts, p+": "+err.Error())
			continue
		}
		parts = append(parts, fmt.Sprintf("%s: %v %d %v", p, fi.Mode(), fi.Size(), fi.ModTime().UnixNano()))
	}
	sort.Strings(parts)
	return strings.Join(parts, "; ")
}

// vmHWM is the peak resident set size of process pid, in bytes.
func vmHWM(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("VmHWM line %q: %v", line, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}

// zerosTarHeader is the header of a tar entry zeros.bin of n bytes.
func zerosTarHeader(n int64) []byte {
	var b bytes.Buffer
	if err := tar.NewWriter(&b).WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "zeros.bin", Size: n, Mode: 0o644}); err != nil {
		panic(err)
	}
	return b.Bytes()
}

// gzipZerosTar returns one gzip member holding a tar of one file, zeros.bin,
// of n zero bytes (n a multiple of 1 MiB): about n/1000 bytes. Compressing
// gigabytes takes minutes under the race detector, so only the first few
// MiB are: after a sync flush, deflate encodes each further MiB of zeros to
// the same bytes (every back-reference lands on zeros), which are then
// repeated. The CRC and size trailer are right: the stream is valid whole.
func gzipZerosTar(n int64) []byte {
	header := zerosTarHeader(n)
	var out bytes.Buffer
	out.Write([]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 0xff}) // deflate, no name, no mtime, best compression, unknown OS
	fw, err := flate.NewWriter(&out, flate.BestCompression)
	if err != nil {
		panic(err)
	}
	fw.Write(header)
	fw.Flush()
	crc := crc32.ChecksumIEEE(header)
	zero := make([]byte, 1<<20)
	var last, repeat []byte
	for done := int64(0); done < n; done += int64(len(zero)) {
		if repeat != nil {
			out.Write(repeat)
		} else {
			start := out.Len()
			fw.Write(zero)
			fw.Flush()
			chunk := bytes.Clone(out.Bytes()[start:])
			if bytes.Equal(chunk, last) {
				repeat = chunk
			}
			last = chunk
		}
		crc = crc32.Update(crc, crc32.IEEETable, zero)
	}
	end := make([]byte, 1024) // the tar's end-of-archive blocks
	fw.Write(end)
	fw.Close()
	crc = crc32.Update(crc, crc32.IEEETable, end)
	b := binary.LittleEndian.AppendUint32(out.Bytes(), crc)
	return binary.LittleEndian.AppendUint32(b, uint32(int64(len(header))+n+1024))
}

// zstdZerosTar returns a zstd frame holding the same tar: a raw block with
// the header, then run-length blocks of 128 KiB of zeros, 4 bytes each.
func zstdZerosTar(n int64) []byte {
	header := zerosTarHeader(n)
	// Magic; frame header: no content size, no checksum; window 2^17.
	b := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3}
	block := func(last bool, typ, size int) {
		h := uint32(size)<<3 | uint32(typ)<<1
		if last {
			h |= 1
		}
		b = append(b, byte(h), byte(h>>8), byte(h>>16))
	}
	const raw, rle = 0, 1
	block(false, raw, len(header))
	b = append(b, header...)
	for rest := n + 1024; rest > 0; {
		size := min(rest, 128<<10)
		rest -= size
		block(rest == 0, rle, int(size))
		b = append(b, 0)
	}
	return b
}
