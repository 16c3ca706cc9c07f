package puller

import (
	"encoding/json"
	"fmt"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Layout names the image layout a module was found in.
type Layout string

const (
	LayoutCNCF      Layout = "cncf-wasm"    // application/wasm layer
	LayoutWasmToOCI Layout = "wasm-to-oci"  // application/vnd.wasm.content.layer.v1+wasm
	LayoutSolo      Layout = "solo-oci"     // application/vnd.module.wasm.content.layer.v1+wasm
	LayoutImage     Layout = "docker-image" // container image, module inside the last layer's tar
)

// Compression of a tar layer.
type Compression int

const (
	CompressionNone Compression = iota
	CompressionGzip
	CompressionZstd
)

// manifestDoc holds the fields of an OCI or Docker manifest or index that
// format detection needs. Both schemas share these JSON names.
type manifestDoc struct {
	SchemaVersion int                  `json:"schemaVersion"`
	MediaType     string               `json:"mediaType"`
	ArtifactType  string               `json:"artifactType"`
	Config        *ocispec.Descriptor  `json:"config"`
	Layers        []ocispec.Descriptor `json:"layers"`
	Manifests     []ocispec.Descriptor `json:"manifests"`
}

func parseManifest(b []byte) (*manifestDoc, error) {
	var m manifestDoc
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	return &m, nil
}

func (m *manifestDoc) isIndex(contentType string) bool {
	switch contentType {
	case MediaTypeOCIIndex, MediaTypeDockerManifestList:
		return true
	}
	switch m.MediaType {
	case MediaTypeOCIIndex, MediaTypeDockerManifestList:
		return true
	}
	return m.Config == nil && len(m.Manifests) > 0
}

// moduleSource says where in an image the module's bytes are.
type moduleSource struct {
	Layer       ocispec.Descriptor
	Layout      Layout
	Tar         bool
	Compression Compression
}

// rawWasmLayer reports whether a layer media type holds the raw module.
func rawWasmLayer(mt string) (Layout, bool) {
	switch mt {
	case MediaTypeWasmLayer:
		return LayoutCNCF, true
	case MediaTypeWasmToOCILayer:
		return LayoutWasmToOCI, true
	case MediaTypeSoloLayer:
		return LayoutSolo, true
	}
	return "", false
}

// tarLayer reports whether a layer media type is a (compressed) tar.
func tarLayer(mt string) (Compression, bool) {
	switch mt {
	case MediaTypeOCILayerTar, MediaTypeDockerLayerTar:
		return CompressionNone, true
	case MediaTypeOCILayerGzip, MediaTypeDockerLayerGzip:
		return CompressionGzip, true
	case MediaTypeOCILayerZstd, MediaTypeDockerLayerZstd:
		return CompressionZstd, true
	}
	return CompressionNone, false
}

// selectModule finds the module in a manifest: exactly one raw Wasm layer in
// one of the Wasm layouts, or else, for a container image, its last layer.
// The error describes what was found, for the user's message.
func selectModule(m *manifestDoc) (moduleSource, error) {
	var found []moduleSource
	for _, l := range m.Layers {
		if layout, ok := rawWasmLayer(l.MediaType); ok {
			found = append(found, moduleSource{Layer: l, Layout: layout})
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
	default:
		return moduleSource{}, fmt.Errorf("%d Wasm module layers in one manifest (%s); push exactly one", len(found), describe(m))
	}
	if len(m.Layers) == 0 {
		return moduleSource{}, fmt.Errorf("the manifest has no layers (%s)", describe(m))
	}
	if m.Config != nil {
		switch m.Config.MediaType {
		case MediaTypeDockerConfig, MediaTypeOCIConfig:
		default:
			return moduleSource{}, fmt.Errorf("no Wasm layer and not a container image (%s)", describe(m))
		}
	}
	last := m.Layers[len(m.Layers)-1]
	comp, ok := tarLayer(last.MediaType)
	if !ok {
		return moduleSource{}, fmt.Errorf("the last layer is neither Wasm nor a tar (%s)", describe(m))
	}
	return moduleSource{Layer: last, Layout: LayoutImage, Tar: true, Compression: comp}, nil
}

// describe lists the media types of a manifest, for error messages.
func describe(m *manifestDoc) string {
	var b strings.Builder
	b.WriteString("config ")
	if m.Config != nil && m.Config.MediaType != "" {
		b.WriteString(m.Config.MediaType)
	} else {
		b.WriteString("none")
	}
	b.WriteString(", layers [")
	for i, l := range m.Layers {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(l.MediaType)
	}
	b.WriteString("]")
	return b.String()
}

// Platform is an OS and architecture, as in an image index.
type Platform struct {
	OS           string
	Architecture string
}

// selectFromIndex picks the index entry for a Wasm module, in this order of
// preference whatever the order of the entries: a wasip1 OS (a core module,
// what proxies load), a wasi OS, a wasm architecture, the node's own
// platform, then the only entry.
func selectFromIndex(m *manifestDoc, node Platform) (ocispec.Descriptor, error) {
	prefs := []func(p *ocispec.Platform) bool{
		func(p *ocispec.Platform) bool { return p.OS == "wasip1" },
		func(p *ocispec.Platform) bool { return p.OS == "wasi" },
		func(p *ocispec.Platform) bool { return p.Architecture == "wasm" },
		func(p *ocispec.Platform) bool { return p.OS == node.OS && p.Architecture == node.Architecture },
	}
	for _, match := range prefs {
		for _, d := range m.Manifests {
			if d.Platform != nil && match(d.Platform) {
				return d, nil
			}
		}
	}
	if len(m.Manifests) == 1 {
		return m.Manifests[0], nil
	}
	var plats []string
	for _, d := range m.Manifests {
		if p := d.Platform; p != nil {
			plats = append(plats, p.OS+"/"+p.Architecture)
		} else {
			plats = append(plats, "no platform")
		}
	}
	return ocispec.Descriptor{}, fmt.Errorf("image index has %d entries and none is for wasip1, wasi or wasm, nor %s/%s (found %s)",
		len(m.Manifests), node.OS, node.Architecture, strings.Join(plats, ", "))
}
