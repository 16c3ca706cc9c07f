package integration

import (
	"archive/tar"
	"context"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// TestLayouts publishes a module in every image layout of the contract and
// checks the container sees exactly its bytes at <target>/plugin.wasm, with
// exactly one blob download: the layer that holds the module.
func TestLayouts(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	// publishAndCheck publishes img, checks the bytes and that the blob
	// downloads were exactly one GET of wantLayer and none of the others.
	publishAndCheck := func(t *testing.T, img string, want []byte, wantLayer digest.Digest, others ...digest.Digest) {
		t.Helper()
		req := e.mustPublish(img, nil)
		checkFile(t, req, "plugin.wasm", want)
		if n := reg.BlobGets(wantLayer); n != 1 {
			t.Errorf("GETs of the module's layer %s: %d, want 1", wantLayer, n)
		}
		for _, d := range others {
			if n := reg.BlobGets(d); n != 0 {
				t.Errorf("GETs of blob %s, which holds no module for this image: %d, want 0", d, n)
			}
		}
		e.mustUnpublish(req)
		checkGone(t, req.TargetPath)
	}

	for _, layout := range registrytest.Layouts() {
		t.Run(layout.String(), func(t *testing.T) {
			repo := repoName(t, "m")
			mod := module(t, "1")
			desc := push(t, repo+":1.0", mod, layout)
			config, layers := manifestBlobs(t, repo, desc)
			last := layers[len(layers)-1]
			if !layout.IsContainerImage() && last != digest.FromBytes(mod) {
				t.Fatalf("the %v layout's last layer is %s, not the module", layout, last)
			}
			publishAndCheck(t, image(repo+":1.0"), mod, last, append([]digest.Digest{config}, layers[:len(layers)-1]...)...)
		})
	}

	// Container images built by hand: the module is found by name in the
	// last layer's tar.
	images := []struct {
		name    string
		entries func(mod, other []byte) []registrytest.TarEntry
	}{
		{"plugin-in-subdirectory", func(mod, other []byte) []registrytest.TarEntry {
			return []registrytest.TarEntry{
				{Name: "etc/", Type: tar.TypeDir},
				{Name: "etc/envoy/", Type: tar.TypeDir},
				{Name: "etc/envoy/README", Body: []byte("filters live here\n")},
				{Name: "etc/envoy/plugin.wasm", Body: mod},
			}
		}},
		{"single-other-wasm", func(mod, other []byte) []registrytest.TarEntry {
			return []registrytest.TarEntry{
				{Name: "LICENSE", Body: []byte("Apache-2.0\n")},
				{Name: "filters/", Type: tar.TypeDir},
				{Name: "filters/header_filter.wasm", Body: mod},
			}
		}},
		{"plugin-after-other-wasm", func(mod, other []byte) []registrytest.TarEntry {
			return []registrytest.TarEntry{
				{Name: "aaa.wasm", Body: other},
				{Name: "plugin.wasm", Body: mod},
			}
		}},
		{"plugin-before-other-wasm", func(mod, other []byte) []registrytest.TarEntry {
			return []registrytest.TarEntry{
				{Name: "plugin.wasm", Body: mod},
				{Name: "zzz.wasm", Body: other},
			}
		}},
	}
	for _, im := range images {
		t.Run(im.name, func(t *testing.T) {
			repo := repoName(t, "m")
			mod, other := module(t, "plugin"), module(t, "other")
			base := registrytest.Layer{Entries: []registrytest.TarEntry{{Name: "README.md", Body: []byte("base layer\n")}}, Compression: registrytest.Gzip}
			top := registrytest.Layer{Entries: im.entries(mod, other), Compression: registrytest.Gzip}
			desc, err := registrytest.PushContainerImage(context.Background(), reg.Host()+"/"+repo+":1.0", []registrytest.Layer{base, top})
			if err != nil {
				t.Fatal(err)
			}
			config, layers := manifestBlobs(t, repo, desc)
			publishAndCheck(t, image(repo+":1.0"), mod, layers[1], config, layers[0])
		})
	}

	t.Run("index-amd64-and-wasm", func(t *testing.T) {
		repo := repoName(t, "m")
		containerMod, wasmMod := module(t, "linux/amd64"), module(t, "wasip1/wasm")
		amd64 := push(t, repo+":amd64", containerMod, registrytest.LayoutOCIGzip)
		wasm := push(t, repo+":wasm", wasmMod, registrytest.LayoutCNCF)
		if _, err := registrytest.PushIndex(context.Background(), reg.Host()+"/"+repo+":1.0", []registrytest.IndexEntry{
			{Descriptor: amd64, Platform: &ocispec.Platform{OS: "linux", Architecture: "amd64"}},
			{Descriptor: wasm, Platform: &ocispec.Platform{OS: "wasip1", Architecture: "wasm"}},
		}); err != nil {
			t.Fatal(err)
		}
		amdConfig, amdLayers := manifestBlobs(t, repo, amd64)
		wasmConfig, _ := manifestBlobs(t, repo, wasm)
		publishAndCheck(t, image(repo+":1.0"), wasmMod, digest.FromBytes(wasmMod), append(amdLayers, amdConfig, wasmConfig)...)
	})

	t.Run("index-single-entry-without-platform", func(t *testing.T) {
		repo := repoName(t, "m")
		mod := module(t, "only")
		only := push(t, repo+":only", mod, registrytest.LayoutWasmToOCI)
		if _, err := registrytest.PushIndex(context.Background(), reg.Host()+"/"+repo+":1.0", []registrytest.IndexEntry{{Descriptor: only}}); err != nil {
			t.Fatal(err)
		}
		publishAndCheck(t, image(repo+":1.0"), mod, digest.FromBytes(mod))
	})

	t.Run("digest-reference", func(t *testing.T) {
		repo := repoName(t, "m")
		mod := module(t, "1")
		desc := push(t, repo+":1.0", mod, registrytest.LayoutCNCF)
		publishAndCheck(t, image(repo+"@"+desc.Digest.String()), mod, digest.FromBytes(mod))
	})

	t.Run("tag-and-digest-reference", func(t *testing.T) {
		// The digest wins: the tag names another module.
		repo := repoName(t, "m")
		mod, other := module(t, "by-digest"), module(t, "by-tag")
		desc := push(t, repo+":pinned", mod, registrytest.LayoutCNCF)
		push(t, repo+":1.0", other, registrytest.LayoutCNCF)
		publishAndCheck(t, image(repo+":1.0@"+desc.Digest.String()), mod, digest.FromBytes(mod), digest.FromBytes(other))
	})

	t.Run("oci-prefix", func(t *testing.T) {
		repo := repoName(t, "m")
		mod := module(t, "1")
		push(t, repo+":1.0", mod, registrytest.LayoutSolo)
		publishAndCheck(t, "oci://"+image(repo+":1.0"), mod, digest.FromBytes(mod))
	})
}
