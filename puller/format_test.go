package puller

import (
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func desc(mt string, n byte) ocispec.Descriptor {
	return ocispec.Descriptor{
		MediaType: mt,
		Digest:    digest.Digest("sha256:" + strings.Repeat(string("0123456789abcdef"[n%16]), 64)),
		Size:      int64(100 + n),
	}
}

func cfg(mt string) *ocispec.Descriptor {
	d := desc(mt, 15)
	return &d
}

func TestSelectModule(t *testing.T) {
	tests := []struct {
		name   string
		m      manifestDoc
		layer  int // index of the expected layer
		layout Layout
		tar    bool
		comp   Compression
	}{
		{
			name:  "cncf",
			m:     manifestDoc{Config: cfg(MediaTypeWasmConfigV0), Layers: []ocispec.Descriptor{desc(MediaTypeWasmLayer, 1)}},
			layer: 0, layout: LayoutCNCF,
		},
		{
			name:  "wasm-to-oci",
			m:     manifestDoc{Config: cfg(MediaTypeWasmToOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeWasmToOCILayer, 1)}},
			layer: 0, layout: LayoutWasmToOCI,
		},
		{
			name:  "solo alone",
			m:     manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeSoloLayer, 1)}},
			layer: 0, layout: LayoutSolo,
		},
		{
			name:  "solo after its config layer",
			m:     manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeSoloConfig, 1), desc(MediaTypeSoloLayer, 2)}},
			layer: 1, layout: LayoutSolo,
		},
		{
			name:  "solo before its config layer",
			m:     manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeSoloLayer, 1), desc(MediaTypeSoloConfig, 2)}},
			layer: 0, layout: LayoutSolo,
		},
		{
			name:  "cncf without config",
			m:     manifestDoc{Layers: []ocispec.Descriptor{desc(MediaTypeWasmLayer, 3)}},
			layer: 0, layout: LayoutCNCF,
		},
		{
			name:  "docker gzip",
			m:     manifestDoc{Config: cfg(MediaTypeDockerConfig), Layers: []ocispec.Descriptor{desc(MediaTypeDockerLayerGzip, 1)}},
			layer: 0, layout: LayoutImage, tar: true, comp: CompressionGzip,
		},
		{
			name:  "docker tar",
			m:     manifestDoc{Config: cfg(MediaTypeDockerConfig), Layers: []ocispec.Descriptor{desc(MediaTypeDockerLayerTar, 1)}},
			layer: 0, layout: LayoutImage, tar: true, comp: CompressionNone,
		},
		{
			name:  "docker zstd",
			m:     manifestDoc{Config: cfg(MediaTypeDockerConfig), Layers: []ocispec.Descriptor{desc(MediaTypeDockerLayerZstd, 1)}},
			layer: 0, layout: LayoutImage, tar: true, comp: CompressionZstd,
		},
		{
			name:  "oci tar",
			m:     manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeOCILayerTar, 1)}},
			layer: 0, layout: LayoutImage, tar: true, comp: CompressionNone,
		},
		{
			name:  "oci gzip",
			m:     manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeOCILayerGzip, 1)}},
			layer: 0, layout: LayoutImage, tar: true, comp: CompressionGzip,
		},
		{
			name:  "oci zstd",
			m:     manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeOCILayerZstd, 1)}},
			layer: 0, layout: LayoutImage, tar: true, comp: CompressionZstd,
		},
		{
			name: "oci image: the last of several layers",
			m: manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{
				desc(MediaTypeOCILayerGzip, 1), desc(MediaTypeOCILayerTar, 2), desc(MediaTypeOCILayerZstd, 3)}},
			layer: 2, layout: LayoutImage, tar: true, comp: CompressionZstd,
		},
		{
			name: "docker image: the last of several layers",
			m: manifestDoc{Config: cfg(MediaTypeDockerConfig), Layers: []ocispec.Descriptor{
				desc(MediaTypeDockerLayerZstd, 1), desc(MediaTypeDockerLayerGzip, 2), desc(MediaTypeDockerLayerTar, 3)}},
			layer: 2, layout: LayoutImage, tar: true, comp: CompressionNone,
		},
		{
			name:  "image without config",
			m:     manifestDoc{Layers: []ocispec.Descriptor{desc(MediaTypeOCILayerTar, 1), desc(MediaTypeOCILayerGzip, 2)}},
			layer: 1, layout: LayoutImage, tar: true, comp: CompressionGzip,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, err := selectModule(&tt.m)
			if err != nil {
				t.Fatalf("selectModule: %v", err)
			}
			want := moduleSource{Layer: tt.m.Layers[tt.layer], Layout: tt.layout, Tar: tt.tar, Compression: tt.comp}
			if src.Layout != want.Layout || src.Tar != want.Tar || src.Compression != want.Compression ||
				src.Layer.Digest != want.Layer.Digest || src.Layer.MediaType != want.Layer.MediaType || src.Layer.Size != want.Layer.Size {
				t.Errorf("selectModule = %+v, want %+v", src, want)
			}
		})
	}
}

func TestSelectModuleRefused(t *testing.T) {
	tests := []struct {
		name string
		m    manifestDoc
		want []string // substrings of the message, in order
	}{
		{
			name: "no layers",
			m:    manifestDoc{Config: cfg(MediaTypeOCIConfig)},
			want: []string{"no layers", "config " + MediaTypeOCIConfig + ", layers []"},
		},
		{
			name: "no layers and no config",
			m:    manifestDoc{},
			want: []string{"no layers", "config none, layers []"},
		},
		{
			name: "two wasm layers",
			m:    manifestDoc{Config: cfg(MediaTypeWasmConfigV0), Layers: []ocispec.Descriptor{desc(MediaTypeWasmLayer, 1), desc(MediaTypeWasmLayer, 2)}},
			want: []string{"2 Wasm module layers", "config " + MediaTypeWasmConfigV0 + ", layers [" + MediaTypeWasmLayer + ", " + MediaTypeWasmLayer + "]", "push exactly one"},
		},
		{
			name: "wasm layers of two layouts",
			m:    manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeSoloLayer, 1), desc(MediaTypeOCILayerTar, 2), desc(MediaTypeWasmToOCILayer, 3)}},
			want: []string{"2 Wasm module layers", "layers [" + MediaTypeSoloLayer + ", " + MediaTypeOCILayerTar + ", " + MediaTypeWasmToOCILayer + "]"},
		},
		{
			name: "unknown layer in an image",
			m:    manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc("application/vnd.example.thing", 1)}},
			want: []string{"neither Wasm nor a tar", "config " + MediaTypeOCIConfig + ", layers [application/vnd.example.thing]"},
		},
		{
			name: "image whose last layer is unknown",
			m:    manifestDoc{Config: cfg(MediaTypeDockerConfig), Layers: []ocispec.Descriptor{desc(MediaTypeDockerLayerGzip, 1), desc("text/plain", 2)}},
			want: []string{"neither Wasm nor a tar", "layers [" + MediaTypeDockerLayerGzip + ", text/plain]"},
		},
		{
			name: "unknown config and layer",
			m:    manifestDoc{Config: cfg("application/vnd.example.config+json"), Layers: []ocispec.Descriptor{desc("application/octet-stream", 1)}},
			want: []string{"no Wasm layer and not a container image", "config application/vnd.example.config+json, layers [application/octet-stream]"},
		},
		{
			name: "wasm config with a tar layer",
			m:    manifestDoc{Config: cfg(MediaTypeWasmConfigV0), Layers: []ocispec.Descriptor{desc(MediaTypeOCILayerTar, 1)}},
			want: []string{"no Wasm layer and not a container image", "config " + MediaTypeWasmConfigV0 + ", layers [" + MediaTypeOCILayerTar + "]"},
		},
		{
			name: "solo config layer alone",
			m:    manifestDoc{Config: cfg(MediaTypeOCIConfig), Layers: []ocispec.Descriptor{desc(MediaTypeSoloConfig, 1)}},
			want: []string{"neither Wasm nor a tar", "layers [" + MediaTypeSoloConfig + "]"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, err := selectModule(&tt.m)
			if err == nil {
				t.Fatalf("selectModule = %+v, want an error", src)
			}
			msg := err.Error()
			rest := msg
			for _, w := range tt.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("message %q does not contain %q (in order)", msg, w)
				}
				rest = rest[i+len(w):]
			}
		})
	}
}

func plat(os, arch string) *ocispec.Platform { return &ocispec.Platform{OS: os, Architecture: arch} }

func entry(n byte, p *ocispec.Platform) ocispec.Descriptor {
	d := desc(MediaTypeOCIManifest, n)
	d.Platform = p
	return d
}

func TestSelectFromIndex(t *testing.T) {
	node := Platform{OS: "linux", Architecture: "arm64"}
	tests := []struct {
		name    string
		entries []ocispec.Descriptor
		want    int
	}{
		{"wasip1 among others", []ocispec.Descriptor{entry(0, plat("linux", "amd64")), entry(1, plat("wasip1", "wasm32"))}, 1},
		{"wasi among others", []ocispec.Descriptor{entry(0, plat("linux", "arm64")), entry(1, plat("wasi", "wasm32"))}, 1},
		{"arch wasm among others", []ocispec.Descriptor{entry(0, plat("linux", "arm64")), entry(1, plat("unknown", "wasm"))}, 1},
		{"wasip1 beats wasi listed first", []ocispec.Descriptor{entry(0, plat("wasi", "wasm32")), entry(1, plat("wasip1", "wasm32"))}, 1},
		{"wasip1 beats arch wasm listed first", []ocispec.Descriptor{entry(0, plat("wasip2", "wasm")), entry(1, plat("wasip1", "wasm32"))}, 1},
		{"wasi beats arch wasm listed first", []ocispec.Descriptor{entry(0, plat("wasip2", "wasm")), entry(1, plat("wasi", "wasm32"))}, 1},
		{"arch wasm beats the node platform listed first", []ocispec.Descriptor{entry(0, plat("linux", "arm64")), entry(1, plat("wasip2", "wasm"))}, 1},
		{"first of two wasip1", []ocispec.Descriptor{entry(0, plat("wasip1", "wasm32")), entry(1, plat("wasip1", "wasm32"))}, 0},
		{"node platform", []ocispec.Descriptor{entry(0, plat("linux", "amd64")), entry(1, plat("linux", "arm64")), entry(2, plat("windows", "arm64"))}, 1},
		{"node platform beats a platformless entry", []ocispec.Descriptor{entry(0, nil), entry(1, plat("linux", "arm64"))}, 1},
		{"only entry, other platform", []ocispec.Descriptor{entry(0, plat("linux", "s390x"))}, 0},
		{"only entry, no platform", []ocispec.Descriptor{entry(0, nil)}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &manifestDoc{MediaType: MediaTypeOCIIndex, Manifests: tt.entries}
			got, err := selectFromIndex(m, node)
			if err != nil {
				t.Fatalf("selectFromIndex: %v", err)
			}
			if got.Digest != tt.entries[tt.want].Digest {
				t.Errorf("selected %s (%+v), want entry %d %s", got.Digest, got.Platform, tt.want, tt.entries[tt.want].Digest)
			}
		})
	}
}

func TestSelectFromIndexRefused(t *testing.T) {
	node := Platform{OS: "linux", Architecture: "arm64"}
	tests := []struct {
		name    string
		entries []ocispec.Descriptor
		want    string
	}{
		{
			"two foreign platforms",
			[]ocispec.Descriptor{entry(0, plat("linux", "amd64")), entry(1, plat("windows", "amd64"))},
			"image index has 2 entries and none is for wasip1, wasi or wasm, nor linux/arm64 (found linux/amd64, windows/amd64)",
		},
		{
			"no platforms",
			[]ocispec.Descriptor{entry(0, nil), entry(1, plat("linux", "ppc64le")), entry(2, nil)},
			"image index has 3 entries and none is for wasip1, wasi or wasm, nor linux/arm64 (found no platform, linux/ppc64le, no platform)",
		},
		{
			"empty index",
			nil,
			"image index has 0 entries and none is for wasip1, wasi or wasm, nor linux/arm64 (found )",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &manifestDoc{MediaType: MediaTypeOCIIndex, Manifests: tt.entries}
			got, err := selectFromIndex(m, node)
			if err == nil {
				t.Fatalf("selectFromIndex = %+v, want an error", got)
			}
			if err.Error() != tt.want {
				t.Errorf("message\n %q\nwant\n %q", err.Error(), tt.want)
			}
		})
	}
}

func TestIsIndex(t *testing.T) {
	tests := []struct {
		name        string
		json        string
		contentType string
		want        bool
	}{
		{"oci index by content type", `{"schemaVersion":2}`, MediaTypeOCIIndex, true},
		{"docker list by content type", `{"schemaVersion":2}`, MediaTypeDockerManifestList, true},
		{"oci index by mediaType", `{"schemaVersion":2,"mediaType":"` + MediaTypeOCIIndex + `"}`, "", true},
		{"docker list by mediaType", `{"schemaVersion":2,"mediaType":"` + MediaTypeDockerManifestList + `"}`, MediaTypeOCIManifest, true},
		{"index by shape", `{"schemaVersion":2,"manifests":[{"mediaType":"` + MediaTypeOCIManifest + `","digest":"sha256:` + hexA + `","size":10}]}`, "", true},
		{"oci manifest", `{"schemaVersion":2,"mediaType":"` + MediaTypeOCIManifest + `","config":{"mediaType":"` + MediaTypeWasmConfigV0 + `","digest":"sha256:` + hexA + `","size":2},"layers":[]}`, MediaTypeOCIManifest, false},
		{"manifest without mediaType or content type", `{"schemaVersion":2,"config":{"mediaType":"` + MediaTypeOCIConfig + `","digest":"sha256:` + hexA + `","size":2},"layers":[]}`, "", false},
		{"docker manifest", `{"schemaVersion":2,"mediaType":"` + MediaTypeDockerManifest + `","config":{"mediaType":"` + MediaTypeDockerConfig + `","digest":"sha256:` + hexA + `","size":2}}`, MediaTypeDockerManifest, false},
		{"config and manifests: not an index by shape", `{"schemaVersion":2,"config":{"mediaType":"` + MediaTypeOCIConfig + `","digest":"sha256:` + hexA + `","size":2},"manifests":[{"digest":"sha256:` + hexA + `","size":1}]}`, "", false},
		{"empty manifests list", `{"schemaVersion":2,"manifests":[]}`, "", false},
		{"empty document", `{}`, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := parseManifest([]byte(tt.json))
			if err != nil {
				t.Fatalf("parseManifest: %v", err)
			}
			if got := m.isIndex(tt.contentType); got != tt.want {
				t.Errorf("isIndex(%q) = %v, want %v", tt.contentType, got, tt.want)
			}
		})
	}
}

func TestParseManifest(t *testing.T) {
	m, err := parseManifest([]byte(`{"schemaVersion":2,"mediaType":"` + MediaTypeOCIManifest + `","artifactType":"application/vnd.example",` +
		`"config":{"mediaType":"` + MediaTypeWasmConfigV0 + `","digest":"sha256:` + hexA + `","size":2},` +
		`"layers":[{"mediaType":"` + MediaTypeWasmLayer + `","digest":"sha256:` + hexB + `","size":1234}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if m.SchemaVersion != 2 || m.MediaType != MediaTypeOCIManifest || m.ArtifactType != "application/vnd.example" ||
		m.Config == nil || m.Config.MediaType != MediaTypeWasmConfigV0 || m.Config.Digest != "sha256:"+hexA ||
		len(m.Layers) != 1 || m.Layers[0].Size != 1234 || m.Layers[0].Digest != "sha256:"+hexB {
		t.Errorf("parseManifest = %+v", m)
	}
	for _, bad := range []string{``, `{`, `[]`, `{"layers":{}}`} {
		if _, err := parseManifest([]byte(bad)); err == nil {
			t.Errorf("parseManifest(%q) succeeded", bad)
		}
	}
}
