package registrytest_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/tetratelabs/wazero"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/content/memory"
	"oras.land/oras-go/v2/registry/remote/errcode"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// pulled is an image copied back from the registry into memory.
type pulled struct {
	store    *memory.Store
	root     ocispec.Descriptor
	manifest ocispec.Manifest
	config   []byte
	layers   [][]byte
}

// pull copies ref (and everything it references) into memory with oras.Copy
// and decodes its manifest.
func pull(t *testing.T, ref string, opts ...registrytest.PushOption) pulled {
	t.Helper()
	ctx := t.Context()
	repo, err := registrytest.Repository(ref, opts...)
	if err != nil {
		t.Fatal(err)
	}
	store := memory.New()
	tag := repo.Reference.Reference
	root, err := oras.Copy(ctx, repo, tag, store, tag, oras.DefaultCopyOptions)
	if err != nil {
		t.Fatalf("oras.Copy %s: %v", ref, err)
	}
	p := pulled{store: store, root: root}
	raw, err := content.FetchAll(ctx, store, root)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &p.manifest); err != nil {
		t.Fatalf("decoding manifest of %s: %v", ref, err)
	}
	if root.MediaType == puller.MediaTypeOCIIndex || root.MediaType == puller.MediaTypeDockerManifestList {
		return p
	}
	if p.config, err = content.FetchAll(ctx, store, p.manifest.Config); err != nil {
		t.Fatal(err)
	}
	for _, l := range p.manifest.Layers {
		b, err := content.FetchAll(ctx, store, l)
		if err != nil {
			t.Fatal(err)
		}
		p.layers = append(p.layers, b)
	}
	return p
}

type tarFile struct {
	hdr  *tar.Header
	body []byte
}

func readTar(t *testing.T, layer []byte, c registrytest.Compression) ([]tarFile, digest.Digest) {
	t.Helper()
	var r io.Reader = bytes.NewReader(layer)
	switch c {
	case registrytest.Gzip:
		gr, err := gzip.NewReader(r)
		if err != nil {
			t.Fatalf("layer is not gzip: %v", err)
		}
		r = gr
	case registrytest.Zstd:
		zr, err := zstd.NewReader(r)
		if err != nil {
			t.Fatalf("layer is not zstd: %v", err)
		}
		defer zr.Close()
		r = zr
	}
	uncompressed, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("decompressing layer: %v", err)
	}
	var files []tarFile
	tr := tar.NewReader(bytes.NewReader(uncompressed))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("reading tar: %v", err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatalf("reading tar entry %s: %v", h.Name, err)
		}
		files = append(files, tarFile{hdr: h, body: body})
	}
	return files, digest.FromBytes(uncompressed)
}

func mediaTypes(ds []ocispec.Descriptor) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.MediaType)
	}
	return out
}

func TestModule(t *testing.T) {
	rt := wazero.NewRuntimeWithConfig(t.Context(), wazero.NewRuntimeConfigInterpreter())
	defer rt.Close(t.Context())
	smallest := len(registrytest.Module("header", 0))
	for _, size := range []int{0, 30, 200, smallest + 16, 4096, 16401, 1 << 20} {
		m := registrytest.Module("header", size)
		if size >= smallest+16 && len(m) != size {
			t.Errorf("Module(header, %d) has %d bytes", size, len(m))
		}
		if _, err := rt.CompileModule(t.Context(), m); err != nil {
			t.Errorf("Module(header, %d) is not a valid module: %v", size, err)
		}
		var buf bytes.Buffer
		if err := registrytest.WriteModule(&buf, "header", int64(size)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf.Bytes(), m) {
			t.Errorf("WriteModule and Module differ for size %d", size)
		}
	}
	if bytes.Equal(registrytest.Module("a", 4096), registrytest.Module("b", 4096)) {
		t.Error("modules with different names are equal")
	}
	if !bytes.Equal(registrytest.Module("a", 4096), registrytest.Module("a", 4096)) {
		t.Error("Module is not deterministic")
	}
	if len(registrytest.Module("a", 4096)) != 4096 {
		t.Error("Module(a, 4096) is not 4096 bytes")
	}
}

func TestParseLayout(t *testing.T) {
	for _, l := range registrytest.Layouts() {
		got, err := registrytest.ParseLayout(l.String())
		if err != nil || got != l {
			t.Errorf("ParseLayout(%q) = %v, %v", l.String(), got, err)
		}
	}
	for alias, want := range map[string]registrytest.Layout{"docker": registrytest.LayoutDockerGzip, "oci": registrytest.LayoutOCIGzip, "solo-with-config": registrytest.LayoutSoloWithConfig} {
		if got, err := registrytest.ParseLayout(alias); err != nil || got != want {
			t.Errorf("ParseLayout(%q) = %v, %v; want %v", alias, got, err, want)
		}
	}
	if _, err := registrytest.ParseLayout("tarball"); err == nil {
		t.Error("ParseLayout(tarball) succeeded")
	}
}

func TestStartMissingBinary(t *testing.T) {
	_, err := registrytest.Start(t.Context(), registrytest.Options{Binary: filepath.Join(t.TempDir(), "registry")})
	if err == nil || !strings.Contains(err.Error(), "run make tools") {
		t.Fatalf("Start with a missing binary: %v; want an error saying to run make tools", err)
	}
	t.Setenv(registrytest.EnvRegistryBinary, filepath.Join(t.TempDir(), "nope"))
	_, err = registrytest.Start(t.Context(), registrytest.Options{})
	if err == nil || !strings.Contains(err.Error(), "nope") || !strings.Contains(err.Error(), "run make tools") {
		t.Fatalf("Start with a missing %s: %v", registrytest.EnvRegistryBinary, err)
	}
}

// checkWasmImage checks an image pushed by PushWasm in layout holds module
// the way the contract describes.
func checkWasmImage(t *testing.T, p pulled, layout registrytest.Layout, module []byte, fileName string) {
	t.Helper()
	m := p.manifest
	moduleDigest := digest.FromBytes(module)
	wantManifestMT := puller.MediaTypeOCIManifest
	if strings.HasPrefix(layout.String(), "docker") {
		wantManifestMT = puller.MediaTypeDockerManifest
	}
	if p.root.MediaType != wantManifestMT || m.MediaType != wantManifestMT {
		t.Errorf("manifest media type %q (descriptor %q), want %q", m.MediaType, p.root.MediaType, wantManifestMT)
	}
	if m.SchemaVersion != 2 {
		t.Errorf("schemaVersion %d", m.SchemaVersion)
	}
	artifact := func(configMT string, layerMTs ...string) {
		t.Helper()
		if m.Config.MediaType != configMT {
			t.Errorf("config media type %q, want %q", m.Config.MediaType, configMT)
		}
		if got := mediaTypes(m.Layers); !slices.Equal(got, layerMTs) {
			t.Fatalf("layer media types %q, want %q", got, layerMTs)
		}
		last := len(m.Layers) - 1
		if m.Layers[last].Digest != moduleDigest || !bytes.Equal(p.layers[last], module) {
			t.Errorf("module layer %s is not the module %s", m.Layers[last].Digest, moduleDigest)
		}
		if got := m.Layers[last].Annotations[ocispec.AnnotationTitle]; got != fileName {
			t.Errorf("module layer title %q, want %q", got, fileName)
		}
	}
	switch layout {
	case registrytest.LayoutCNCF:
		artifact(puller.MediaTypeWasmConfigV0, puller.MediaTypeWasmLayer)
		var cfg struct {
			Architecture string   `json:"architecture"`
			OS           string   `json:"os"`
			LayerDigests []string `json:"layerDigests"`
			Created      string   `json:"created"`
		}
		if err := json.Unmarshal(p.config, &cfg); err != nil {
			t.Fatalf("config: %v", err)
		}
		if cfg.Architecture != "wasm" || cfg.OS != "wasip1" || !slices.Equal(cfg.LayerDigests, []string{moduleDigest.String()}) || cfg.Created == "" {
			t.Errorf("config %s", p.config)
		}
	case registrytest.LayoutWasmToOCI:
		artifact(puller.MediaTypeWasmToOCIConfig, puller.MediaTypeWasmToOCILayer)
		if !json.Valid(p.config) {
			t.Errorf("config is not JSON: %q", p.config)
		}
	case registrytest.LayoutSolo:
		artifact(ocispec.MediaTypeEmptyJSON, puller.MediaTypeSoloLayer)
		if string(p.config) != "{}" {
			t.Errorf("config %q", p.config)
		}
	case registrytest.LayoutSoloWithConfig:
		artifact(ocispec.MediaTypeEmptyJSON, puller.MediaTypeSoloConfig, puller.MediaTypeSoloLayer)
		var rc struct {
			Type        string   `json:"type"`
			ABIVersions []string `json:"abiVersions"`
		}
		if err := json.Unmarshal(p.layers[0], &rc); err != nil || rc.Type != "envoy_proxy" || len(rc.ABIVersions) == 0 {
			t.Errorf("runtime config layer %q (%v)", p.layers[0], err)
		}
	default:
		docker := strings.HasPrefix(layout.String(), "docker")
		var c registrytest.Compression
		switch {
		case strings.HasSuffix(layout.String(), "gzip"):
			c = registrytest.Gzip
		case strings.HasSuffix(layout.String(), "zstd"):
			c = registrytest.Zstd
		}
		wantLayerMT := map[bool]map[registrytest.Compression]string{
			true:  {registrytest.Uncompressed: puller.MediaTypeDockerLayerTar, registrytest.Gzip: puller.MediaTypeDockerLayerGzip, registrytest.Zstd: puller.MediaTypeDockerLayerZstd},
			false: {registrytest.Uncompressed: puller.MediaTypeOCILayerTar, registrytest.Gzip: puller.MediaTypeOCILayerGzip, registrytest.Zstd: puller.MediaTypeOCILayerZstd},
		}[docker][c]
		wantConfigMT := puller.MediaTypeOCIConfig
		if docker {
			wantConfigMT = puller.MediaTypeDockerConfig
		}
		if m.Config.MediaType != wantConfigMT {
			t.Errorf("config media type %q, want %q", m.Config.MediaType, wantConfigMT)
		}
		if got := mediaTypes(m.Layers); !slices.Equal(got, []string{wantLayerMT}) {
			t.Fatalf("layer media types %q, want [%q]", got, wantLayerMT)
		}
		files, diffID := readTar(t, p.layers[0], c)
		if len(files) != 1 {
			t.Fatalf("tar has %d entries, want 1", len(files))
		}
		f := files[0]
		if f.hdr.Name != fileName || f.hdr.Typeflag != tar.TypeReg || f.hdr.Mode != 0o644 || !bytes.Equal(f.body, module) {
			t.Errorf("tar entry %q type %c mode %o (%d bytes), want %q 0644 with the module", f.hdr.Name, f.hdr.Typeflag, f.hdr.Mode, len(f.body), fileName)
		}
		var img ocispec.Image
		if err := json.Unmarshal(p.config, &img); err != nil {
			t.Fatalf("image config: %v", err)
		}
		if img.Architecture != "amd64" || img.OS != "linux" || img.RootFS.Type != "layers" || !slices.Equal(img.RootFS.DiffIDs, []digest.Digest{diffID}) {
			t.Errorf("image config %s; want linux/amd64 with diff_ids [%s]", p.config, diffID)
		}
	}
}

func TestPushWasmLayouts(t *testing.T) {
	reg := registrytest.StartT(t, registrytest.Options{})
	for _, layout := range registrytest.Layouts() {
		t.Run(layout.String(), func(t *testing.T) {
			module := registrytest.Module("layout-"+layout.String(), 3000)
			ref := reg.Host() + "/filters/" + layout.String() + ":1.0"
			desc, err := registrytest.PushWasm(t.Context(), ref, module, layout)
			if err != nil {
				t.Fatal(err)
			}
			p := pull(t, ref)
			if p.root.Digest != desc.Digest || p.root.Size != desc.Size || p.root.MediaType != desc.MediaType {
				t.Errorf("pushed %v, pulled %v", desc, p.root)
			}
			checkWasmImage(t, p, layout, module, registrytest.DefaultFileName)

			// Pushing the same module again gives the same digest.
			again, err := registrytest.PushWasm(t.Context(), ref, module, layout)
			if err != nil {
				t.Fatal(err)
			}
			if again.Digest != desc.Digest {
				t.Errorf("second push gave %s, first %s", again.Digest, desc.Digest)
			}
		})
	}
}

func TestPushWasmOptions(t *testing.T) {
	reg := registrytest.StartT(t, registrytest.Options{})
	ctx := t.Context()
	module := registrytest.Module("options", 1000)

	// Nested file name, extra tags, manifest annotations.
	ref := reg.Host() + "/opts/nested:v1"
	desc, err := registrytest.PushWasm(ctx, ref, module, registrytest.LayoutOCIGzip,
		registrytest.WithFileName("filters/header.wasm"),
		registrytest.WithTags("v1.0", "latest"),
		registrytest.WithAnnotations(map[string]string{"module.wasm.image/variant": "compat"}))
	if err != nil {
		t.Fatal(err)
	}
	for _, tag := range []string{"v1", "v1.0", "latest"} {
		p := pull(t, reg.Host()+"/opts/nested:"+tag)
		if p.root.Digest != desc.Digest {
			t.Errorf("tag %s is %s, want %s", tag, p.root.Digest, desc.Digest)
		}
		if p.manifest.Annotations["module.wasm.image/variant"] != "compat" {
			t.Errorf("annotations %v", p.manifest.Annotations)
		}
		checkWasmImage(t, p, registrytest.LayoutOCIGzip, module, "filters/header.wasm")
	}

	// No tag means latest; a digest reference pushes by digest.
	desc2, err := registrytest.PushWasm(ctx, reg.Host()+"/opts/untagged", module, registrytest.LayoutCNCF)
	if err != nil {
		t.Fatal(err)
	}
	if p := pull(t, reg.Host()+"/opts/untagged:latest"); p.root.Digest != desc2.Digest {
		t.Errorf("latest is %s, want %s", p.root.Digest, desc2.Digest)
	}
	if _, err := registrytest.PushWasm(ctx, reg.Host()+"/opts/bydigest@"+desc2.Digest.String(), module, registrytest.LayoutCNCF); err != nil {
		t.Errorf("push by digest: %v", err)
	}
	wrong := digest.FromString("something else")
	if _, err := registrytest.PushWasm(ctx, reg.Host()+"/opts/bydigest@"+wrong.String(), module, registrytest.LayoutCNCF); err == nil {
		t.Error("push to a digest reference that is not the manifest's succeeded")
	}

	// A replaced config and platform.
	desc3, err := registrytest.PushWasm(ctx, reg.Host()+"/opts/cfg:1", module, registrytest.LayoutSolo,
		registrytest.WithConfig(registrytest.Blob{MediaType: "application/vnd.unknown.config.v1+json", Data: []byte("{}")}),
		registrytest.WithArtifactType(""))
	if err != nil {
		t.Fatal(err)
	}
	p := pull(t, reg.Host()+"/opts/cfg:1")
	if p.root.Digest != desc3.Digest || p.manifest.Config.MediaType != "application/vnd.unknown.config.v1+json" || p.manifest.ArtifactType != "" {
		t.Errorf("manifest %+v", p.manifest)
	}
	if _, err := registrytest.PushWasm(ctx, reg.Host()+"/opts/arm:1", module, registrytest.LayoutDockerGzip,
		registrytest.WithPlatform(ocispec.Platform{OS: "linux", Architecture: "arm64"})); err != nil {
		t.Fatal(err)
	}
	var img ocispec.Image
	if err := json.Unmarshal(pull(t, reg.Host()+"/opts/arm:1").config, &img); err != nil || img.Architecture != "arm64" {
		t.Errorf("platform %s/%s (%v), want linux/arm64", img.OS, img.Architecture, err)
	}
}

func TestPushWasmFile(t *testing.T) {
	reg := registrytest.StartT(t, registrytest.Options{})
	ctx := t.Context()
	dir := t.TempDir()

	// 64 MiB as an artifact: the file is streamed, never read into memory.
	const big = 64 << 20
	path := filepath.Join(dir, "big.wasm")
	if err := registrytest.WriteModuleFile(path, "big", big); err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	desc, err := registrytest.PushWasmFile(ctx, reg.Host()+"/big/cncf:1", path, registrytest.LayoutCNCF)
	if err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("pushing a %d MiB file allocated %d KiB", big>>20, alloc>>10)
	if alloc > big/4 {
		t.Errorf("pushing a %d byte file allocated %d bytes; it should stream", big, alloc)
	}
	repo, err := registrytest.Repository(reg.Host() + "/big/cncf:1")
	if err != nil {
		t.Fatal(err)
	}
	_, rc, err := repo.FetchReference(ctx, "1")
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	err = json.NewDecoder(rc).Decode(&m)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want, err := digest.FromReader(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != 1 || m.Layers[0].Digest != want || m.Layers[0].Size != big {
		t.Fatalf("layers %+v, want one of %s, %d bytes (manifest %s)", m.Layers, want, big, desc.Digest)
	}
	blob, err := repo.Blobs().Fetch(ctx, m.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	got, err := digest.FromReader(blob)
	blob.Close()
	if err != nil || got != want {
		t.Errorf("blob fetched back is %s (%v), want %s", got, err, want)
	}

	// Container layouts from a file (smaller: they compress it).
	module := registrytest.Module("file-container", 1<<20)
	small := filepath.Join(dir, "small.wasm")
	if err := os.WriteFile(small, module, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, layout := range registrytest.Layouts() {
		ref := reg.Host() + "/file/" + layout.String() + ":1"
		fromFile, err := registrytest.PushWasmFile(ctx, ref, small, layout)
		if err != nil {
			t.Fatalf("%v: %v", layout, err)
		}
		fromMem, err := registrytest.PushWasm(ctx, ref, module, layout)
		if err != nil {
			t.Fatal(err)
		}
		if fromFile.Digest != fromMem.Digest {
			t.Errorf("%v: PushWasmFile gave %s, PushWasm %s", layout, fromFile.Digest, fromMem.Digest)
		}
		checkWasmImage(t, pull(t, ref), layout, module, registrytest.DefaultFileName)
	}
	if _, err := registrytest.PushWasmFile(ctx, reg.Host()+"/file/missing:1", filepath.Join(dir, "missing.wasm"), registrytest.LayoutCNCF); err == nil {
		t.Error("PushWasmFile of a missing file succeeded")
	}
}

func TestProxyCounts(t *testing.T) {
	reg := registrytest.StartT(t, registrytest.Options{})
	ctx := t.Context()
	module := registrytest.Module("counted", 2048)
	desc, err := registrytest.PushWasm(ctx, reg.Host()+"/counted/m:1", module, registrytest.LayoutSoloWithConfig)
	if err != nil {
		t.Fatal(err)
	}
	if n := reg.Counts().Requests; n != 0 {
		t.Errorf("pushing to Host() counted %d requests", n)
	}

	p := pull(t, reg.ProxyHost()+"/counted/m:1")
	if p.root.Digest != desc.Digest {
		t.Fatalf("pulled %s through the proxy, pushed %s", p.root.Digest, desc.Digest)
	}
	blobs := append([]ocispec.Descriptor{p.manifest.Config}, p.manifest.Layers...)
	for _, b := range blobs {
		if n := reg.BlobGets(b.Digest); n != 1 {
			t.Errorf("BlobGets(%s %s) = %d, want 1", b.MediaType, b.Digest, n)
		}
	}
	if n := reg.TotalBlobGets(); n != len(blobs) {
		t.Errorf("TotalBlobGets = %d, want %d", n, len(blobs))
	}
	if reg.ManifestGets()+reg.ManifestHeads() == 0 {
		t.Error("no manifest request counted")
	}
	c := reg.Counts()
	if c.ManifestGets["counted/m:1"]+c.ManifestHeads["counted/m:1"] == 0 {
		t.Errorf("manifest requests by reference: GET %v HEAD %v", c.ManifestGets, c.ManifestHeads)
	}

	pull(t, reg.ProxyHost()+"/counted/m:1")
	if n := reg.BlobGets(digest.FromBytes(module)); n != 2 {
		t.Errorf("BlobGets(module) after two pulls = %d, want 2", n)
	}
	reg.ResetCounts()
	if c := reg.Counts(); c.Requests != 0 || reg.TotalBlobGets() != 0 || reg.ManifestGets() != 0 || len(c.BlobGets) != 0 {
		t.Errorf("after ResetCounts: %+v", c)
	}

	// Pushing through the proxy works (upload Locations point back at it).
	if _, err := registrytest.PushWasm(ctx, reg.ProxyHost()+"/counted/via-proxy:1", module, registrytest.LayoutDockerGzip); err != nil {
		t.Fatalf("push through the proxy: %v", err)
	}
	checkWasmImage(t, pull(t, reg.ProxyHost()+"/counted/via-proxy:1"), registrytest.LayoutDockerGzip, module, registrytest.DefaultFileName)
}

func TestFaults(t *testing.T) {
	reg := registrytest.StartT(t, registrytest.Options{})
	ctx := t.Context()
	module := registrytest.Module("faulty", 2048)
	if _, err := registrytest.PushWasm(ctx, reg.Host()+"/faulty/m:1", module, registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	moduleDigest := digest.FromBytes(module)
	repo, err := registrytest.Repository(reg.ProxyHost() + "/faulty/m:1")
	if err != nil {
		t.Fatal(err)
	}
	layer := ocispec.Descriptor{MediaType: puller.MediaTypeWasmLayer, Digest: moduleDigest, Size: int64(len(module))}
	isModuleGet := func(r *http.Request) bool {
		return r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+moduleDigest.String())
	}

	// A status answer.
	reg.SetFault(func(r *http.Request) (int, bool) {
		if isModuleGet(r) {
			return http.StatusServiceUnavailable, true
		}
		return 0, false
	})
	_, err = content.FetchAll(ctx, repo, layer)
	var ec *errcode.ErrorResponse
	if !errors.As(err, &ec) || ec.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("fetch with a 503 fault: %v", err)
	}
	if n := reg.BlobGets(moduleDigest); n != 1 {
		t.Errorf("faulted GET counted %d times, want 1", n)
	}
	// Manifests still pass.
	if _, err := repo.Resolve(ctx, "1"); err != nil {
		t.Errorf("resolve with a blob-only fault: %v", err)
	}

	// A dropped connection.
	reg.SetFault(func(r *http.Request) (int, bool) { return 0, isModuleGet(r) })
	if _, err := content.FetchAll(ctx, repo, layer); err == nil {
		t.Error("fetch with a dropped connection succeeded")
	}

	// Corrupted bytes, through an interceptor.
	reg.SetFault(nil)
	reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !isModuleGet(r) {
				next.ServeHTTP(w, r)
				return
			}
			w.Header().Set("Content-Length", "2048")
			w.WriteHeader(http.StatusOK)
			w.Write(bytes.Repeat([]byte{'x'}, 2048))
		})
	})
	if _, err := content.FetchAll(ctx, repo, layer); err == nil {
		t.Error("fetch of corrupted bytes succeeded")
	}

	reg.SetInterceptor(nil)
	got, err := content.FetchAll(ctx, repo, layer)
	if err != nil || !bytes.Equal(got, module) {
		t.Errorf("fetch after clearing the faults: %v", err)
	}
}

func TestBasicAuth(t *testing.T) {
	reg := registrytest.StartT(t, registrytest.Options{Htpasswd: map[string]string{"alice": "s3cret", "bob": "hunter2"}})
	ctx := t.Context()
	module := registrytest.Module("private", 1024)
	ref := reg.Host() + "/private/m:1"

	if _, err := registrytest.PushWasm(ctx, ref, module, registrytest.LayoutCNCF); !isStatus(err, http.StatusUnauthorized) {
		t.Errorf("push without credentials: %v, want 401", err)
	}
	if _, err := registrytest.PushWasm(ctx, ref, module, registrytest.LayoutCNCF, registrytest.WithBasicAuth("alice", "wrong")); !isStatus(err, http.StatusUnauthorized) {
		t.Errorf("push with a bad password: %v, want 401", err)
	}
	desc, err := registrytest.PushWasm(ctx, ref, module, registrytest.LayoutCNCF, registrytest.WithBasicAuth("alice", "s3cret"))
	if err != nil {
		t.Fatalf("push with good credentials: %v", err)
	}

	for _, host := range []string{reg.Host(), reg.ProxyHost()} {
		for _, c := range []struct {
			name       string
			user, pass string
			status     int
		}{
			{"none", "", "", http.StatusUnauthorized},
			{"bad password", "bob", "s3cret", http.StatusUnauthorized},
			{"unknown user", "mallory", "s3cret", http.StatusUnauthorized},
			{"good", "bob", "hunter2", 0},
		} {
			repo, err := registrytest.Repository(host+"/private/m:1", registrytest.WithBasicAuth(c.user, c.pass))
			if err != nil {
				t.Fatal(err)
			}
			got, err := repo.Resolve(ctx, "1")
			switch {
			case c.status == 0 && (err != nil || got.Digest != desc.Digest):
				t.Errorf("%s, %s credentials: resolve %v, %v", host, c.name, got.Digest, err)
			case c.status != 0 && !isStatus(err, c.status):
				t.Errorf("%s, %s credentials: %v, want HTTP %d", host, c.name, err, c.status)
			}
		}
	}
	if users := reg.Users(); users["alice"] != "s3cret" || len(users) != 2 {
		t.Errorf("Users() = %v", users)
	}
}

func isStatus(err error, status int) bool {
	var ec *errcode.ErrorResponse
	return errors.As(err, &ec) && ec.StatusCode == status
}

func TestPushContainerImage(t *testing.T) {
	reg := registrytest.StartT(t, registrytest.Options{})
	ctx := t.Context()
	module := registrytest.Module("hostile", 700)
	hostile := []registrytest.TarEntry{
		{Name: "etc/", Type: tar.TypeDir},
		{Name: "../../escape.wasm", Body: module},
		{Name: "/abs/plugin.wasm", Body: module},
		{Name: "link.wasm", Type: tar.TypeSymlink, Linkname: "/etc/shadow"},
		{Name: "hard.wasm", Type: tar.TypeLink, Linkname: "../../escape.wasm"},
		{Name: "dev/null.wasm", Type: tar.TypeChar, Devmajor: 1, Devminor: 3},
		{Name: "exec.wasm", Body: []byte("\x00asm"), Mode: 0o4755},
		{Name: strings.Repeat("d/", 80) + "deep.wasm", Body: module},
	}
	for _, docker := range []bool{false, true} {
		var opts []registrytest.PushOption
		if docker {
			opts = append(opts, registrytest.WithDockerMediaTypes())
		}
		ref := reg.Host() + "/hostile/entries:" + map[bool]string{false: "oci", true: "docker"}[docker]
		desc, err := registrytest.PushContainerImage(ctx, ref, []registrytest.Layer{
			{Entries: []registrytest.TarEntry{{Name: "first.txt", Body: []byte("base")}}, Compression: registrytest.Gzip},
			{Entries: hostile, Compression: registrytest.Zstd},
		}, opts...)
		if err != nil {
			t.Fatal(err)
		}
		p := pull(t, ref)
		wantMT := map[bool]string{false: puller.MediaTypeOCIManifest, true: puller.MediaTypeDockerManifest}[docker]
		if desc.MediaType != wantMT || p.manifest.MediaType != wantMT {
			t.Errorf("manifest media type %q, want %q", p.manifest.MediaType, wantMT)
		}
		wantLayers := map[bool][]string{
			false: {puller.MediaTypeOCILayerGzip, puller.MediaTypeOCILayerZstd},
			true:  {puller.MediaTypeDockerLayerGzip, puller.MediaTypeDockerLayerZstd},
		}[docker]
		if got := mediaTypes(p.manifest.Layers); !slices.Equal(got, wantLayers) {
			t.Errorf("layer media types %q, want %q", got, wantLayers)
		}
		files, diffID := readTar(t, p.layers[1], registrytest.Zstd)
		if len(files) != len(hostile) {
			t.Fatalf("%d tar entries, want %d", len(files), len(hostile))
		}
		for i, e := range hostile {
			h := files[i].hdr
			wantType := e.Type
			if wantType == 0 {
				wantType = tar.TypeReg
			}
			if h.Name != e.Name || h.Typeflag != wantType || h.Linkname != e.Linkname || !bytes.Equal(files[i].body, e.Body) {
				t.Errorf("entry %d: %q type %c link %q, want %q type %c link %q", i, h.Name, h.Typeflag, h.Linkname, e.Name, wantType, e.Linkname)
			}
		}
		if files[5].hdr.Devmajor != 1 || files[5].hdr.Devminor != 3 || files[6].hdr.Mode != 0o4755 {
			t.Errorf("device %d,%d mode %o", files[5].hdr.Devmajor, files[5].hdr.Devminor, files[6].hdr.Mode)
		}
		var img ocispec.Image
		if err := json.Unmarshal(p.config, &img); err != nil || len(img.RootFS.DiffIDs) != 2 || img.RootFS.DiffIDs[1] != diffID {
			t.Errorf("diff_ids %v (%v), want [_, %s]", img.RootFS.DiffIDs, err, diffID)
		}
	}

	// A header that claims more than the body holds: a truncated tar.
	lying := registrytest.Module("lying", 100)
	ref := reg.Host() + "/hostile/size:1"
	if _, err := registrytest.PushContainerImage(ctx, ref, []registrytest.Layer{{
		Entries: []registrytest.TarEntry{{Name: "plugin.wasm", Body: lying, Size: 1 << 30}},
	}}); err != nil {
		t.Fatal(err)
	}
	p := pull(t, ref)
	tr := tar.NewReader(bytes.NewReader(p.layers[0]))
	h, err := tr.Next()
	if err != nil || h.Size != 1<<30 {
		t.Fatalf("header %+v, %v; want size 1 GiB", h, err)
	}
	if _, err := io.Copy(io.Discard, tr); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("reading the lying entry: %v, want unexpected EOF", err)
	}
	if p.manifest.Layers[0].MediaType != puller.MediaTypeOCILayerTar {
		t.Errorf("uncompressed layer media type %q", p.manifest.Layers[0].MediaType)
	}

	// Raw bytes that claim to be tar+gzip, and a forced media type.
	garbage := []byte("this is not gzip at all")
	ref = reg.Host() + "/hostile/raw:1"
	if _, err := registrytest.PushContainerImage(ctx, ref, []registrytest.Layer{
		{Raw: garbage, Compression: registrytest.Gzip},
		{Entries: []registrytest.TarEntry{{Name: "plugin.wasm", Body: lying}}, MediaType: "application/vnd.example.weird"},
	}, registrytest.WithDockerMediaTypes()); err != nil {
		t.Fatal(err)
	}
	p = pull(t, ref)
	if !bytes.Equal(p.layers[0], garbage) || p.manifest.Layers[0].MediaType != puller.MediaTypeDockerLayerGzip {
		t.Errorf("raw layer %q %q", p.manifest.Layers[0].MediaType, p.layers[0])
	}
	if p.manifest.Layers[1].MediaType != "application/vnd.example.weird" {
		t.Errorf("forced media type %q", p.manifest.Layers[1].MediaType)
	}
}

func TestPushIndex(t *testing.T) {
	reg := registrytest.StartT(t, registrytest.Options{})
	ctx := t.Context()
	repoRef := reg.Host() + "/multi/filter"
	wasmModule := registrytest.Module("index-wasm", 512)
	wasmDesc, err := registrytest.PushWasm(ctx, repoRef+":wasm", wasmModule, registrytest.LayoutCNCF)
	if err != nil {
		t.Fatal(err)
	}
	amd64Desc, err := registrytest.PushWasm(ctx, repoRef+":amd64", registrytest.Module("index-amd64", 512), registrytest.LayoutOCIGzip)
	if err != nil {
		t.Fatal(err)
	}
	entries := []registrytest.IndexEntry{
		{Descriptor: amd64Desc, Platform: &ocispec.Platform{OS: "linux", Architecture: "amd64"}},
		{Descriptor: wasmDesc, Platform: &ocispec.Platform{OS: "wasip1", Architecture: "wasm"}},
	}
	idxDesc, err := registrytest.PushIndex(ctx, repoRef+":1.0", entries)
	if err != nil {
		t.Fatal(err)
	}
	if idxDesc.MediaType != puller.MediaTypeOCIIndex {
		t.Errorf("index media type %q", idxDesc.MediaType)
	}
	p := pull(t, repoRef+":1.0")
	var idx ocispec.Index
	raw, err := content.FetchAll(ctx, p.store, p.root)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &idx); err != nil {
		t.Fatal(err)
	}
	if idx.MediaType != puller.MediaTypeOCIIndex || len(idx.Manifests) != 2 {
		t.Fatalf("index %s", raw)
	}
	for i, e := range entries {
		got := idx.Manifests[i]
		if got.Digest != e.Descriptor.Digest || got.MediaType != e.Descriptor.MediaType || got.Platform == nil ||
			got.Platform.OS != e.Platform.OS || got.Platform.Architecture != e.Platform.Architecture {
			t.Errorf("entry %d: %+v, want %+v on %+v", i, got, e.Descriptor, e.Platform)
		}
	}
	// oras.Copy brought the children along.
	if ok, err := p.store.Exists(ctx, ocispec.Descriptor{MediaType: puller.MediaTypeWasmLayer, Digest: digest.FromBytes(wasmModule), Size: int64(len(wasmModule))}); err != nil || !ok {
		t.Errorf("the wasm entry's layer was not copied: %v", err)
	}

	// A Docker manifest list of Docker images.
	d1, err := registrytest.PushWasm(ctx, repoRef+":d-amd64", registrytest.Module("d1", 300), registrytest.LayoutDockerGzip)
	if err != nil {
		t.Fatal(err)
	}
	d2, err := registrytest.PushWasm(ctx, repoRef+":d-arm64", registrytest.Module("d2", 300), registrytest.LayoutDockerGzip,
		registrytest.WithPlatform(ocispec.Platform{OS: "linux", Architecture: "arm64"}))
	if err != nil {
		t.Fatal(err)
	}
	listDesc, err := registrytest.PushIndex(ctx, repoRef+":docker", []registrytest.IndexEntry{
		{Descriptor: d1, Platform: &ocispec.Platform{OS: "linux", Architecture: "amd64"}},
		{Descriptor: d2, Platform: &ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}},
	}, registrytest.WithDockerMediaTypes())
	if err != nil {
		t.Fatal(err)
	}
	p = pull(t, repoRef+":docker")
	if listDesc.MediaType != puller.MediaTypeDockerManifestList || p.root.MediaType != puller.MediaTypeDockerManifestList {
		t.Errorf("manifest list media type %q / %q", listDesc.MediaType, p.root.MediaType)
	}

	// By default every entry must exist; AllowIncompleteIndexes lifts that.
	missing := ocispec.Descriptor{MediaType: puller.MediaTypeOCIManifest, Digest: digest.FromString("missing"), Size: 7}
	if _, err := registrytest.PushIndex(ctx, repoRef+":broken", []registrytest.IndexEntry{{Descriptor: missing}}); err == nil {
		t.Error("an index with a missing entry was accepted")
	}
	loose := registrytest.StartT(t, registrytest.Options{AllowIncompleteIndexes: true})
	if _, err := registrytest.PushIndex(ctx, loose.Host()+"/multi/filter:broken", []registrytest.IndexEntry{{Descriptor: missing}}); err != nil {
		t.Errorf("an index with a missing entry, AllowIncompleteIndexes: %v", err)
	}
}

func TestClose(t *testing.T) {
	reg, err := registrytest.Start(context.Background(), registrytest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dir, host := reg.Dir(), reg.Host()
	if _, err := os.Stat(filepath.Join(dir, "config.yml")); err != nil {
		t.Errorf("config: %v", err)
	}
	if err := reg.Close(); err != nil {
		t.Fatal(err)
	}
	if err := reg.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still there after Close: %v", dir, err)
	}
	if resp, err := http.Get("http://" + host + "/v2/"); err == nil {
		resp.Body.Close()
		t.Errorf("registry still answers at %s after Close", host)
	}
}
