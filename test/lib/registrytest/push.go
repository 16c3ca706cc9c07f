package registrytest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/wasm-csi/wasm-csi/puller"
)

// Layout is one of the image layouts of the contract a module can be pushed
// in.
type Layout int

const (
	// LayoutCNCF is the CNCF TAG Runtime Wasm artifact: config
	// application/vnd.wasm.config.v0+json, one application/wasm layer.
	LayoutCNCF Layout = iota + 1
	// LayoutWasmToOCI is the older wasm-to-oci artifact: config
	// application/vnd.wasm.config.v1+json, one
	// application/vnd.wasm.content.layer.v1+wasm layer.
	LayoutWasmToOCI
	// LayoutSolo is solo.io's (Istio's "oci" variant) single
	// application/vnd.module.wasm.content.layer.v1+wasm layer, with the empty
	// config `oras push` writes (application/vnd.oci.empty.v1+json, {}).
	LayoutSolo
	// LayoutSoloWithConfig is LayoutSolo plus a
	// application/vnd.module.wasm.config.v1+json runtime-config layer, which
	// comes first, as in the solo.io spec.
	LayoutSoloWithConfig
	// LayoutDockerTar, LayoutDockerGzip and LayoutDockerZstd are a Docker
	// schema 2 image "FROM scratch; COPY plugin.wasm ./" whose one layer is
	// tar, tar+gzip or tar+zstd.
	LayoutDockerTar
	LayoutDockerGzip
	LayoutDockerZstd
	// LayoutOCITar, LayoutOCIGzip and LayoutOCIZstd are the same image with
	// OCI media types.
	LayoutOCITar
	LayoutOCIGzip
	LayoutOCIZstd
)

// Layouts returns every layout, for table-driven tests.
func Layouts() []Layout {
	return []Layout{
		LayoutCNCF, LayoutWasmToOCI, LayoutSolo, LayoutSoloWithConfig,
		LayoutDockerTar, LayoutDockerGzip, LayoutDockerZstd,
		LayoutOCITar, LayoutOCIGzip, LayoutOCIZstd,
	}
}

// String returns the layout's name as ParseLayout accepts it.
func (l Layout) String() string {
	switch l {
	case LayoutCNCF:
		return "cncf"
	case LayoutWasmToOCI:
		return "wasm-to-oci"
	case LayoutSolo:
		return "solo"
	case LayoutSoloWithConfig:
		return "solo-config"
	case LayoutDockerTar:
		return "docker-tar"
	case LayoutDockerGzip:
		return "docker-gzip"
	case LayoutDockerZstd:
		return "docker-zstd"
	case LayoutOCITar:
		return "oci-tar"
	case LayoutOCIGzip:
		return "oci-gzip"
	case LayoutOCIZstd:
		return "oci-zstd"
	}
	return fmt.Sprintf("Layout(%d)", int(l))
}

// ParseLayout parses a layout name (Layout.String), or one of the aliases
// "docker" (docker-gzip), "oci" (oci-gzip) and "solo-with-config".
func ParseLayout(s string) (Layout, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "docker":
		return LayoutDockerGzip, nil
	case "oci":
		return LayoutOCIGzip, nil
	case "solo-with-config":
		return LayoutSoloWithConfig, nil
	}
	for _, l := range Layouts() {
		if strings.EqualFold(s, l.String()) {
			return l, nil
		}
	}
	names := make([]string, 0, len(Layouts()))
	for _, l := range Layouts() {
		names = append(names, l.String())
	}
	return 0, fmt.Errorf("registrytest: unknown layout %q (want one of %s, docker, oci)", s, strings.Join(names, ", "))
}

// IsContainerImage reports whether the layout is a container image (the
// module inside a tar layer) rather than a Wasm artifact.
func (l Layout) IsContainerImage() bool {
	_, _, ok := l.container()
	return ok
}

func (l Layout) container() (docker bool, c Compression, ok bool) {
	switch l {
	case LayoutDockerTar:
		return true, Uncompressed, true
	case LayoutDockerGzip:
		return true, Gzip, true
	case LayoutDockerZstd:
		return true, Zstd, true
	case LayoutOCITar:
		return false, Uncompressed, true
	case LayoutOCIGzip:
		return false, Gzip, true
	case LayoutOCIZstd:
		return false, Zstd, true
	}
	return false, 0, false
}

// DefaultFileName is the name of the module in pushed images: the tar entry
// of container layouts, the title annotation of artifact layers.
const DefaultFileName = "plugin.wasm"

// PushOption configures the pushers and Repository.
type PushOption func(*pushOptions)

type pushOptions struct {
	plainHTTP    *bool
	user, pass   string
	docker       bool
	annotations  map[string]string
	config       *Blob
	fileName     string
	tags         []string
	platform     *ocispec.Platform
	httpClient   *http.Client
	artifactType *string
}

func newPushOptions(opts []PushOption) *pushOptions {
	o := &pushOptions{fileName: DefaultFileName}
	for _, opt := range opts {
		opt(o)
	}
	return o
}

// WithPlainHTTP talks HTTP (true) or HTTPS (false) to the registry. By
// default, loopback hosts (127.0.0.0/8, ::1, localhost) get plain HTTP and
// every other host HTTPS.
func WithPlainHTTP(plain bool) PushOption {
	return func(o *pushOptions) { o.plainHTTP = &plain }
}

// WithBasicAuth sends these credentials to the registry.
func WithBasicAuth(user, password string) PushOption {
	return func(o *pushOptions) { o.user, o.pass = user, password }
}

// WithDockerMediaTypes makes PushContainerImage push a Docker schema 2 image
// (manifest, config and layer media types) and PushIndex a Docker manifest
// list. PushWasm takes the media types from its Layout instead.
func WithDockerMediaTypes() PushOption {
	return func(o *pushOptions) { o.docker = true }
}

// WithAnnotations sets the manifest's (or index's) annotations.
func WithAnnotations(a map[string]string) PushOption {
	return func(o *pushOptions) { o.annotations = a }
}

// WithConfig replaces the config blob PushWasm or PushContainerImage would
// write. An empty MediaType keeps the layout's config media type.
func WithConfig(config Blob) PushOption {
	return func(o *pushOptions) { o.config = &config }
}

// WithArtifactType sets the manifest's artifactType field ("" leaves it
// out) of artifact layouts.
func WithArtifactType(t string) PushOption {
	return func(o *pushOptions) { o.artifactType = &t }
}

// WithFileName names the module in the image: the tar entry of container
// layouts (may hold directories, e.g. "filters/header.wasm"), the title
// annotation of artifact layers. The default is DefaultFileName.
func WithFileName(name string) PushOption {
	return func(o *pushOptions) { o.fileName = name }
}

// WithTags adds tags to the pushed manifest besides the one in ref.
func WithTags(tags ...string) PushOption {
	return func(o *pushOptions) { o.tags = append(o.tags, tags...) }
}

// WithPlatform sets the os/architecture written in the image config:
// container layouts and PushContainerImage (default linux/amd64) and
// LayoutCNCF (default wasip1/wasm).
func WithPlatform(p ocispec.Platform) PushOption {
	return func(o *pushOptions) { o.platform = &p }
}

// WithHTTPClient sends the requests through c (default: a client on
// http.DefaultTransport).
func WithHTTPClient(c *http.Client) PushOption {
	return func(o *pushOptions) { o.httpClient = c }
}

// Blob is an in-memory blob with its media type.
type Blob struct {
	MediaType   string
	Data        []byte
	Annotations map[string]string
}

// Artifact describes an OCI artifact manifest for PushArtifact.
type Artifact struct {
	// ArtifactType is the manifest's artifactType; may be empty.
	ArtifactType string
	// Config is the config blob; nil means the empty JSON config
	// (application/vnd.oci.empty.v1+json, {}).
	Config *Blob
	// Layers are the layer blobs, in order.
	Layers []Blob
	// Annotations of the manifest.
	Annotations map[string]string
}

// IndexEntry is one manifest of an image index pushed with PushIndex.
type IndexEntry struct {
	// Descriptor of a manifest pushed earlier to the same repository (what
	// the pushers return).
	Descriptor ocispec.Descriptor
	// Platform of the entry; nil leaves it out.
	Platform *ocispec.Platform
}

// Repository returns an oras-go repository for ref ("host[:port]/name[:tag]"
// or "...@digest"; an "oci://" prefix is ignored) with the options' plain
// HTTP and credentials, for pulling content back in tests.
func Repository(ref string, opts ...PushOption) (*remote.Repository, error) {
	return newRepository(ref, newPushOptions(opts))
}

func newRepository(ref string, o *pushOptions) (*remote.Repository, error) {
	ref = strings.TrimPrefix(ref, "oci://")
	repo, err := remote.NewRepository(ref)
	if err != nil {
		return nil, fmt.Errorf("registrytest: parsing reference %q: %w", ref, err)
	}
	if o.plainHTTP != nil {
		repo.PlainHTTP = *o.plainHTTP
	} else {
		repo.PlainHTTP = isLoopback(repo.Reference.Registry)
	}
	client := o.httpClient
	if client == nil {
		client = &http.Client{}
	}
	if o.user == "" && o.pass == "" {
		// Anonymous: a registry that wants credentials answers 401, and
		// that is the error the caller sees.
		repo.Client = client
		return repo, nil
	}
	repo.Client = &auth.Client{
		Client:     client,
		Cache:      auth.NewCache(),
		Credential: auth.StaticCredential(repo.Reference.Registry, auth.Credential{Username: o.user, Password: o.pass}),
	}
	return repo, nil
}

func isLoopback(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}

// PushArtifact pushes an OCI manifest with the given config and layers to
// ref and returns the manifest's descriptor.
func PushArtifact(ctx context.Context, ref string, a Artifact, opts ...PushOption) (ocispec.Descriptor, error) {
	o := newPushOptions(opts)
	cfg := emptyConfig()
	if a.Config != nil {
		cfg = blobFromBytes(*a.Config)
	}
	layers := make([]blobSource, 0, len(a.Layers))
	for _, l := range a.Layers {
		layers = append(layers, blobFromBytes(l))
	}
	ann := a.Annotations
	if ann == nil {
		ann = o.annotations
	}
	mt, manifest, err := artifactManifest(a.ArtifactType, cfg, layers, ann)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	return pushManifest(ctx, ref, o, mt, manifest, append(layers, cfg))
}

// PushWasm pushes module to ref in layout and returns the manifest's
// descriptor; ref's tag (default "latest") points at it.
func PushWasm(ctx context.Context, ref string, module []byte, layout Layout, opts ...PushOption) (ocispec.Descriptor, error) {
	src := moduleSource{data: module, size: int64(len(module)), digest: digest.FromBytes(module)}
	return pushWasm(ctx, ref, src, layout, newPushOptions(opts))
}

// PushWasmFile is PushWasm for a module in a file of any size: the file is
// streamed (hashed first, then uploaded), never held in memory; container
// layouts spool their layer to a temporary file.
func PushWasmFile(ctx context.Context, ref, path string, layout Layout, opts ...PushOption) (ocispec.Descriptor, error) {
	dgst, size, err := digestFile(path)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	src := moduleSource{path: path, size: size, digest: dgst}
	return pushWasm(ctx, ref, src, layout, newPushOptions(opts))
}

func pushWasm(ctx context.Context, ref string, src moduleSource, layout Layout, o *pushOptions) (ocispec.Descriptor, error) {
	mt, manifest, blobs, cleanup, err := wasmImage(src, layout, o)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("registrytest: building %v image for %s: %w", layout, ref, err)
	}
	defer cleanup()
	return pushManifest(ctx, ref, o, mt, manifest, blobs)
}

// PushContainerImage pushes a container image with these layers (OCI media
// types, or Docker ones with WithDockerMediaTypes) and an image config whose
// rootfs.diff_ids match them, and returns the manifest's descriptor.
func PushContainerImage(ctx context.Context, ref string, layers []Layer, opts ...PushOption) (ocispec.Descriptor, error) {
	o := newPushOptions(opts)
	blobs := make([]blobSource, 0, len(layers)+1)
	diffIDs := make([]digest.Digest, 0, len(layers))
	for i, l := range layers {
		mt := l.MediaType
		if mt == "" {
			var err error
			if mt, err = layerMediaType(l.Compression, o.docker); err != nil {
				return ocispec.Descriptor{}, fmt.Errorf("registrytest: layer %d of %s: %w", i, ref, err)
			}
		}
		data, diffID := l.Raw, l.DiffID
		if data == nil {
			sources := make([]tarSource, 0, len(l.Entries))
			for _, e := range l.Entries {
				sources = append(sources, e.source())
			}
			var buf bytes.Buffer
			d, err := writeLayer(&buf, l.Compression, sources)
			if err != nil {
				return ocispec.Descriptor{}, fmt.Errorf("registrytest: layer %d of %s: %w", i, ref, err)
			}
			data = buf.Bytes()
			if diffID == "" {
				diffID = d
			}
		} else if diffID == "" {
			diffID = rawDiffID(data, l.Compression)
		}
		blobs = append(blobs, blobFromBytes(Blob{MediaType: mt, Data: data}))
		diffIDs = append(diffIDs, diffID)
	}
	cfg, err := imageConfig(o, o.docker, diffIDs)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("registrytest: image config of %s: %w", ref, err)
	}
	mt, manifest, err := imageManifest(o.docker, cfg, blobs, o.annotations)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("registrytest: manifest of %s: %w", ref, err)
	}
	return pushManifest(ctx, ref, o, mt, manifest, append(blobs, cfg))
}

// PushIndex pushes an OCI image index (a Docker manifest list with
// WithDockerMediaTypes) of entries to ref and returns its descriptor. The
// entries must already be in the repository (see
// Options.AllowIncompleteIndexes).
func PushIndex(ctx context.Context, ref string, entries []IndexEntry, opts ...PushOption) (ocispec.Descriptor, error) {
	o := newPushOptions(opts)
	mt := puller.MediaTypeOCIIndex
	if o.docker {
		mt = puller.MediaTypeDockerManifestList
	}
	idx := ocispec.Index{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   mt,
		Manifests:   make([]ocispec.Descriptor, 0, len(entries)),
		Annotations: o.annotations,
	}
	for _, e := range entries {
		d := ocispec.Descriptor{
			MediaType:    e.Descriptor.MediaType,
			Digest:       e.Descriptor.Digest,
			Size:         e.Descriptor.Size,
			ArtifactType: e.Descriptor.ArtifactType,
			Annotations:  e.Descriptor.Annotations,
			Platform:     e.Platform,
		}
		idx.Manifests = append(idx.Manifests, d)
	}
	b, err := json.Marshal(idx)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("registrytest: encoding index for %s: %w", ref, err)
	}
	return pushManifest(ctx, ref, o, mt, b, nil)
}

// moduleSource is the module's bytes, in memory or in a file.
type moduleSource struct {
	data   []byte
	path   string
	size   int64
	digest digest.Digest
}

func (m moduleSource) open() (io.ReadCloser, error) {
	if m.path == "" {
		return io.NopCloser(bytes.NewReader(m.data)), nil
	}
	f, err := os.Open(m.path)
	if err != nil {
		return nil, fmt.Errorf("registrytest: opening module: %w", err)
	}
	return f, nil
}

// blobSource is a blob to push: its descriptor and its bytes, in memory or
// in a file.
type blobSource struct {
	desc ocispec.Descriptor
	data []byte
	path string
}

func (b blobSource) open() (io.ReadCloser, error) {
	if b.path == "" {
		return io.NopCloser(bytes.NewReader(b.data)), nil
	}
	f, err := os.Open(b.path)
	if err != nil {
		return nil, fmt.Errorf("registrytest: opening blob %s: %w", b.desc.Digest, err)
	}
	return f, nil
}

func blobFromBytes(b Blob) blobSource {
	d := content.NewDescriptorFromBytes(b.MediaType, b.Data)
	d.Annotations = b.Annotations
	return blobSource{desc: d, data: b.Data}
}

func emptyConfig() blobSource {
	return blobFromBytes(Blob{MediaType: ocispec.MediaTypeEmptyJSON, Data: []byte("{}")})
}

// wasmImage builds the manifest and blobs of src in layout. cleanup removes
// any temporary file and is never nil.
func wasmImage(src moduleSource, layout Layout, o *pushOptions) (mediaType string, manifest []byte, blobs []blobSource, cleanup func(), err error) {
	cleanup = func() {}
	if docker, c, ok := layout.container(); ok {
		return containerWasmImage(src, docker, c, o)
	}

	moduleBlob := func(mt string) blobSource {
		return blobSource{
			desc: ocispec.Descriptor{
				MediaType:   mt,
				Digest:      src.digest,
				Size:        src.size,
				Annotations: map[string]string{ocispec.AnnotationTitle: o.fileName},
			},
			data: src.data,
			path: src.path,
		}
	}
	var (
		cfg          blobSource
		layers       []blobSource
		artifactType string
	)
	switch layout {
	case LayoutCNCF:
		mod := moduleBlob(puller.MediaTypeWasmLayer)
		p := ocispec.Platform{OS: "wasip1", Architecture: "wasm"}
		if o.platform != nil {
			p = *o.platform
		}
		created := fixedTime()
		b, err := json.Marshal(cncfConfig{
			Created:      created.Format(time.RFC3339),
			Architecture: p.Architecture,
			OS:           p.OS,
			LayerDigests: []string{src.digest.String()},
		})
		if err != nil {
			return "", nil, nil, cleanup, fmt.Errorf("encoding wasm config: %w", err)
		}
		cfg = blobFromBytes(Blob{MediaType: puller.MediaTypeWasmConfigV0, Data: b})
		layers = []blobSource{mod}
	case LayoutWasmToOCI:
		cfg = blobFromBytes(Blob{MediaType: puller.MediaTypeWasmToOCIConfig, Data: []byte("{}")})
		layers = []blobSource{moduleBlob(puller.MediaTypeWasmToOCILayer)}
	case LayoutSolo, LayoutSoloWithConfig:
		cfg = emptyConfig()
		artifactType = "application/vnd.unknown.artifact.v1" // what `oras push` writes with an empty config
		if layout == LayoutSoloWithConfig {
			rc := blobFromBytes(Blob{
				MediaType:   puller.MediaTypeSoloConfig,
				Data:        []byte(`{"type":"envoy_proxy","abiVersions":["v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f","v0.2.1"],"config":{"rootIds":["registrytest_root"]}}`),
				Annotations: map[string]string{ocispec.AnnotationTitle: "runtime-config.json"},
			})
			layers = append(layers, rc)
		}
		layers = append(layers, moduleBlob(puller.MediaTypeSoloLayer))
	default:
		return "", nil, nil, cleanup, fmt.Errorf("unknown layout %v", layout)
	}
	if o.config != nil {
		cfg = overrideConfig(cfg.desc.MediaType, *o.config)
	}
	if o.artifactType != nil {
		artifactType = *o.artifactType
	}
	mt, m, err := artifactManifest(artifactType, cfg, layers, o.annotations)
	if err != nil {
		return "", nil, nil, cleanup, err
	}
	return mt, m, append(layers, cfg), cleanup, nil
}

// cncfConfig is the application/vnd.wasm.config.v0+json config of a Wasm
// module (not a component) as the CNCF layout has it.
type cncfConfig struct {
	Created      string   `json:"created"`
	Architecture string   `json:"architecture"`
	OS           string   `json:"os"`
	LayerDigests []string `json:"layerDigests"`
}

func overrideConfig(defaultMediaType string, b Blob) blobSource {
	if b.MediaType == "" {
		b.MediaType = defaultMediaType
	}
	return blobFromBytes(b)
}

// containerWasmImage builds "FROM scratch; COPY plugin.wasm ./". A module
// in a file gets its layer spooled to a temporary file, removed by cleanup.
func containerWasmImage(src moduleSource, docker bool, c Compression, o *pushOptions) (mediaType string, manifest []byte, blobs []blobSource, cleanup func(), err error) {
	cleanup = func() {}
	fail := func(err error) (string, []byte, []blobSource, func(), error) {
		cleanup()
		return "", nil, nil, func() {}, err
	}
	layerMT, err := layerMediaType(c, docker)
	if err != nil {
		return fail(err)
	}
	body, err := src.open()
	if err != nil {
		return fail(err)
	}
	defer body.Close()
	entries := []tarSource{fileEntry(o.fileName, body, src.size)}

	compressed := digest.SHA256.Digester()
	counter := &countingWriter{}
	layer := blobSource{}
	var diffID digest.Digest
	if src.path == "" {
		var buf bytes.Buffer
		if diffID, err = writeLayer(io.MultiWriter(&buf, compressed.Hash(), counter), c, entries); err != nil {
			return fail(err)
		}
		layer.data = buf.Bytes()
	} else {
		f, err := os.CreateTemp("", "registrytest-layer-")
		if err != nil {
			return fail(fmt.Errorf("creating layer spool file: %w", err))
		}
		name := f.Name()
		cleanup = func() { _ = os.Remove(name) }
		diffID, err = writeLayer(io.MultiWriter(f, compressed.Hash(), counter), c, entries)
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("closing layer spool file: %w", cerr)
		}
		if err != nil {
			return fail(err)
		}
		layer.path = name
	}
	layer.desc = ocispec.Descriptor{MediaType: layerMT, Digest: compressed.Digest(), Size: counter.n}

	cfg, err := imageConfig(o, docker, []digest.Digest{diffID})
	if err != nil {
		return fail(err)
	}
	mt, m, err := imageManifest(docker, cfg, []blobSource{layer}, o.annotations)
	if err != nil {
		return fail(err)
	}
	return mt, m, []blobSource{layer, cfg}, cleanup, nil
}

// imageConfig is the image config of a "FROM scratch; COPY" image, as
// docker build writes it, unless WithConfig replaced it.
func imageConfig(o *pushOptions, docker bool, diffIDs []digest.Digest) (blobSource, error) {
	mt := puller.MediaTypeOCIConfig
	if docker {
		mt = puller.MediaTypeDockerConfig
	}
	if o.config != nil {
		return overrideConfig(mt, *o.config), nil
	}
	p := ocispec.Platform{OS: "linux", Architecture: "amd64"}
	if o.platform != nil {
		p = *o.platform
	}
	created := fixedTime()
	img := ocispec.Image{
		Created:  &created,
		Platform: p,
		Config: ocispec.ImageConfig{
			Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			WorkingDir: "/",
		},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
		History: []ocispec.History{{
			Created:   &created,
			CreatedBy: fmt.Sprintf("COPY %s ./ # buildkit", o.fileName),
			Comment:   "buildkit.dockerfile.v0",
		}},
	}
	b, err := json.Marshal(img)
	if err != nil {
		return blobSource{}, fmt.Errorf("encoding image config: %w", err)
	}
	return blobFromBytes(Blob{MediaType: mt, Data: b}), nil
}

// imageManifest encodes a Docker schema 2 or OCI image manifest. The two
// formats have the same fields here.
func imageManifest(docker bool, cfg blobSource, layers []blobSource, annotations map[string]string) (string, []byte, error) {
	mt := puller.MediaTypeOCIManifest
	if docker {
		mt = puller.MediaTypeDockerManifest
		annotations = nil // Docker schema 2 has no annotations
	}
	m := ocispec.Manifest{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   mt,
		Config:      cfg.desc,
		Layers:      descriptors(layers),
		Annotations: annotations,
	}
	b, err := json.Marshal(m)
	if err != nil {
		return "", nil, fmt.Errorf("encoding manifest: %w", err)
	}
	return mt, b, nil
}

func artifactManifest(artifactType string, cfg blobSource, layers []blobSource, annotations map[string]string) (string, []byte, error) {
	m := ocispec.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    puller.MediaTypeOCIManifest,
		ArtifactType: artifactType,
		Config:       cfg.desc,
		Layers:       descriptors(layers),
		Annotations:  annotations,
	}
	b, err := json.Marshal(m)
	if err != nil {
		return "", nil, fmt.Errorf("registrytest: encoding manifest: %w", err)
	}
	return m.MediaType, b, nil
}

func descriptors(blobs []blobSource) []ocispec.Descriptor {
	out := make([]ocispec.Descriptor, 0, len(blobs))
	for _, b := range blobs {
		out = append(out, b.desc)
	}
	return out
}

// pushManifest uploads the blobs the registry lacks, then the manifest,
// under ref's tag (default "latest") or digest, then the extra tags.
func pushManifest(ctx context.Context, ref string, o *pushOptions, mediaType string, manifest []byte, blobs []blobSource) (ocispec.Descriptor, error) {
	repo, err := newRepository(ref, o)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	seen := make(map[digest.Digest]bool, len(blobs))
	for _, b := range blobs {
		if seen[b.desc.Digest] {
			continue
		}
		seen[b.desc.Digest] = true
		if err := pushBlob(ctx, repo, b); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("registrytest: pushing %s to %s: %w", b.desc.MediaType, ref, err)
		}
	}
	desc := content.NewDescriptorFromBytes(mediaType, manifest)
	reference := repo.Reference.Reference
	switch {
	case reference == "":
		reference = "latest"
		fallthrough
	case repo.Reference.ValidateReferenceAsDigest() != nil:
		err = repo.PushReference(ctx, desc, bytes.NewReader(manifest), reference)
	default:
		if digest.Digest(reference) != desc.Digest {
			return ocispec.Descriptor{}, fmt.Errorf("registrytest: %s names digest %s but the manifest built is %s", ref, reference, desc.Digest)
		}
		err = repo.Push(ctx, desc, bytes.NewReader(manifest))
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("registrytest: pushing manifest %s to %s: %w", desc.Digest, ref, err)
	}
	for _, tag := range o.tags {
		if err := repo.Tag(ctx, desc, tag); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("registrytest: tagging %s as %s in %s: %w", desc.Digest, tag, repo.Reference.Repository, err)
		}
	}
	return desc, nil
}

func pushBlob(ctx context.Context, repo *remote.Repository, b blobSource) error {
	exists, err := repo.Blobs().Exists(ctx, b.desc)
	if err != nil {
		return fmt.Errorf("checking blob %s: %w", b.desc.Digest, err)
	}
	if exists {
		return nil
	}
	rc, err := b.open()
	if err != nil {
		return err
	}
	defer rc.Close()
	if err := repo.Blobs().Push(ctx, b.desc, rc); err != nil {
		return fmt.Errorf("blob %s (%d bytes): %w", b.desc.Digest, b.desc.Size, err)
	}
	return nil
}

// digestFile streams path through sha256.
func digestFile(path string) (digest.Digest, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, fmt.Errorf("registrytest: opening module file: %w", err)
	}
	defer f.Close()
	d := digest.SHA256.Digester()
	n, err := io.Copy(d.Hash(), f)
	if err != nil {
		return "", 0, fmt.Errorf("registrytest: reading module file %s: %w", path, err)
	}
	return d.Digest(), n, nil
}

type countingWriter struct{ n int64 }

func (c *countingWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return len(p), nil
}
