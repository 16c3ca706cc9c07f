// Package puller turns an image reference into verified module bytes: it
// parses references, resolves them against a registry or its mirrors (oras-go
// v2), tries the credentials a pull may use in kubelet's order, follows the
// Wasm image layouts it accepts, and streams the module into a Sink, checking
// sizes and digests as it goes. Every address it dials passes the network
// guard (netguard.go).
//
// It owns: registry traffic, credentials' parsing and matching, size caps,
// and the errors of a pull (errdefs sentinels).
//
// It must not: write to disk except through the Sink it is given, know the
// node's store or volumes, or pick gRPC codes.
package puller

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/errdef"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/errcode"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/hostsconf"
)

// Defaults for Config's limits.
const (
	DefaultMaxModuleSize   = 256 << 20
	DefaultMaxManifestSize = 4 << 20
	maxIndexDepth          = 2
	readAheadChunks        = 4
)

// Config is how a Puller reaches registries.
type Config struct {
	// InsecureRegistries are reached over plain HTTP: "host:port" names that
	// port, "host" alone every port of it. Every other registry is HTTPS.
	InsecureRegistries []string
	// Mirrors maps a registry host to mirrors tried before it, in order.
	Mirrors map[string][]string
	// Runtime is the container runtime's registry configuration
	// (hosts.toml, registries.conf): its mirrors are tried after Mirrors,
	// and the hosts it names pass the address checks. Nil: none.
	Runtime *hostsconf.Resolver
	// DockerConfig is the path of a Docker config.json with node credentials.
	DockerConfig string
	// CredentialProvider gives node credentials from kubelet's credential
	// provider plugins, tried after a pod's secrets and before DockerConfig
	// (nil: none).
	CredentialProvider CredentialProvider
	// MaxModuleSize caps a module's bytes (default 256 MiB).
	MaxModuleSize int64
	// MaxManifestSize caps a manifest or index (default 4 MiB).
	MaxManifestSize int64
	// Platform is the node's own, for image indexes (default: this binary's).
	Platform Platform
	// BlockedCIDRs are networks never dialed for an image, beside the
	// loopback, link-local and cloud-metadata addresses that always are
	// (unless the host is named by InsecureRegistries or Mirrors).
	BlockedCIDRs []netip.Prefix
	// ResponseHeaderTimeout bounds the wait for a response's headers
	// (default DefaultResponseHeaderTimeout).
	ResponseHeaderTimeout time.Duration
	// IdleTimeout cuts off a response body that sends nothing for this long
	// (default DefaultIdleTimeout).
	IdleTimeout time.Duration
	// RetryBudget bounds the retries of one request: none starts later than
	// this after the first attempt (default DefaultRetryBudget).
	RetryBudget time.Duration
	// Transport is the base HTTP transport (default: one with timeouts
	// whose dialer refuses blocked addresses). A Transport given here is
	// used as it is: it bypasses the address checks.
	Transport http.RoundTripper
	// UserAgent is sent to registries.
	UserAgent string
	// Buffers are the buffers every pull takes its read-ahead chunks and
	// copy buffer from (default: a pool of its own with
	// DefaultBufferBudget). Pullers that share it share its budget.
	Buffers *Buffers
}

// Puller turns an image reference into verified module bytes.
type Puller struct {
	cfg       Config
	client    *http.Client
	nodeCache auth.Cache
	endpoints endpointClients
}

// New returns a Puller for cfg.
func New(cfg Config) *Puller {
	if cfg.MaxModuleSize <= 0 {
		cfg.MaxModuleSize = DefaultMaxModuleSize
	}
	if cfg.MaxManifestSize <= 0 {
		cfg.MaxManifestSize = DefaultMaxManifestSize
	}
	if cfg.Platform.OS == "" {
		cfg.Platform = Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}
	}
	if cfg.ResponseHeaderTimeout <= 0 {
		cfg.ResponseHeaderTimeout = DefaultResponseHeaderTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.RetryBudget <= 0 {
		cfg.RetryBudget = DefaultRetryBudget
	}
	if cfg.Transport == nil {
		cfg.Transport = defaultTransport(cfg, newAddressPolicy(cfg))
	}
	if cfg.UserAgent == "" {
		cfg.UserAgent = "wasm-csi"
	}
	if cfg.Buffers == nil {
		cfg.Buffers = NewBuffers(BufferSize, DefaultBufferBudget)
	}
	// Token requests of the auth client go through this client too, so
	// bearer realms meet the same address checks, timeouts and retries.
	transport := &idleTransport{base: &retryTransport{base: cfg.Transport, budget: cfg.RetryBudget}, idle: cfg.IdleTimeout}
	return &Puller{
		cfg:       cfg,
		client:    &http.Client{Transport: transport},
		nodeCache: auth.NewCache(),
	}
}

// plainHTTP reports whether host[:port] was named by --insecure-registry.
func (p *Puller) plainHTTP(registry string) bool {
	host := registry
	if h, _, err := net.SplitHostPort(registry); err == nil {
		host = h
	}
	for _, r := range p.cfg.InsecureRegistries {
		if r == registry || r == host {
			return true
		}
	}
	return false
}

// repository returns a client for ref's repository that presents cred.
// Tokens of anonymous and node credentials are cached across pulls; a pod's
// secret gets a cache of its own, so no token crosses from one pod's
// credentials to another pull.
func (p *Puller) repository(ref Reference, cred Credential) (*remote.Repository, error) {
	repo, err := remote.NewRepository(ref.Name())
	if err != nil {
		return nil, errdefs.New(errdefs.ErrInvalidReference, ref.Original, err, "cannot use this repository name")
	}
	repo.PlainHTTP = p.plainHTTP(ref.Registry) || (ref.Endpoint != nil && ref.Endpoint.Scheme == "http")
	httpClient := p.client
	if c, err := p.clientFor(ref.Endpoint); err != nil {
		return nil, errdefs.New(errdefs.ErrUnavailable, ref.Original, err, "cannot set up TLS for %s", ref.Registry)
	} else if c != nil {
		httpClient = c
	}
	cache := p.nodeCache
	if cred.FromPodSecret() {
		cache = auth.NewCache()
	}
	client := &auth.Client{Client: httpClient, Cache: cache, Header: http.Header{"User-Agent": {p.cfg.UserAgent}}}
	if !cred.Anonymous() {
		client.Credential = auth.StaticCredential(ref.Registry, cred.Cred)
	}
	repo.Client = client
	repo.SkipReferrersGC = true
	return repo, nil
}

// nodeSource names the node's --docker-config as a credential source.
const nodeSource = "node --docker-config"

// Resolve asks the registry which manifest the reference names now,
// presenting cred.
func (p *Puller) Resolve(ctx context.Context, ref Reference, cred Credential) (ocispec.Descriptor, error) {
	repo, err := p.repository(ref, cred)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	target := ref.Tag
	if ref.Digest != "" {
		target = ref.Digest.String()
	}
	desc, err := repo.Resolve(ctx, target)
	if err != nil {
		return ocispec.Descriptor{}, classify(ref, err, "resolving "+target)
	}
	return desc, nil
}

// ResolveWith tries each credential in order until the registry accepts
// one, and returns the manifest and the credential that worked. When every
// one is refused the error names each source tried (never its contents);
// when a source failed to give a credential (a credential provider plugin)
// and every other one was refused, the failure is the error: Unavailable,
// naming the plugin, since fixing or retrying it is what helps.
func (p *Puller) ResolveWith(ctx context.Context, ref Reference, attempts []Credential) (ocispec.Descriptor, Credential, error) {
	var tried []string
	var failed []error
	var last error
	for _, c := range attempts {
		if c.Err != nil {
			failed = append(failed, c.Err)
			continue
		}
		desc, err := p.Resolve(ctx, ref, c)
		if err == nil {
			return desc, c, nil
		}
		if !errors.Is(err, errdefs.ErrUnauthorized) {
			return ocispec.Descriptor{}, Credential{}, err
		}
		tried = append(tried, c.Source)
		last = err
	}
	if len(failed) > 0 {
		var why []string
		for _, err := range failed {
			var pe *errdefs.Error
			if errors.As(err, &pe) {
				why = append(why, pe.Msg)
			} else {
				why = append(why, err.Error())
			}
		}
		if len(tried) > 0 {
			why = append(why, fmt.Sprintf("%s refused every other credential tried (%s)", ref.Registry, strings.Join(tried, ", ")))
		}
		return ocispec.Descriptor{}, Credential{}, errdefs.New(errdefs.ErrUnavailable, ref.Original, nil,
			"%s; fix the plugin (the driver's log has its stderr) or give the pod an imagePullSecret", strings.Join(why, "; "))
	}
	if last == nil {
		return ocispec.Descriptor{}, Credential{}, errdefs.New(errdefs.ErrUnauthorized, ref.Original, nil, "no credentials to try")
	}
	return ocispec.Descriptor{}, Credential{}, errdefs.New(errdefs.ErrUnauthorized, ref.Original, nil,
		"%s refused every credential tried (%s); give the pod an imagePullSecret, or the node a credential provider or --docker-config, that the registry accepts",
		ref.Registry, strings.Join(tried, ", "))
}

// Module describes a pulled module.
type Module struct {
	// Manifest is the digest of the manifest the module came from (for an
	// index, the index's own digest is what Resolve returned).
	Manifest digest.Digest
	// Layer is the digest of the layer that held the module.
	Layer digest.Digest
	// Layout is the image layout the module was found in.
	Layout Layout
	// Size is the module's size in bytes.
	Size int64
	// Subjects are the manifests a signature may cover: the one the module
	// came from, then the index(es) it was chosen from, innermost first.
	Subjects []ocispec.Descriptor
}

// Pull fetches the image whose top-level manifest is desc and streams its
// module into sink, verifying every digest on the way. Nothing is buffered
// whole: memory stays flat whatever the module's size.
func (p *Puller) Pull(ctx context.Context, ref Reference, desc ocispec.Descriptor, sink Sink, cred Credential) (Module, error) {
	repo, err := p.repository(ref, cred)
	if err != nil {
		return Module{}, err
	}
	m, err := p.fetchManifest(ctx, repo, ref, desc)
	if err != nil {
		return Module{}, err
	}
	var indexes []ocispec.Descriptor
	for depth := 0; m.isIndex(desc.MediaType); depth++ {
		if depth >= maxIndexDepth {
			return Module{}, errdefs.New(errdefs.ErrUnsupportedImage, ref.Original, nil, "image index nests more than %d levels deep", maxIndexDepth)
		}
		child, err := selectFromIndex(m, p.cfg.Platform)
		if err != nil {
			return Module{}, errdefs.New(errdefs.ErrUnsupportedImage, ref.Original, err, "no Wasm entry in the image index")
		}
		if child.Digest == desc.Digest {
			return Module{}, errdefs.New(errdefs.ErrUnsupportedImage, ref.Original, nil, "image index points to itself")
		}
		indexes = append([]ocispec.Descriptor{desc}, indexes...)
		desc = child
		if m, err = p.fetchManifest(ctx, repo, ref, desc); err != nil {
			return Module{}, err
		}
	}
	// The config is never downloaded (the layers say where the module is),
	// but one over the manifest cap belongs to no real image: refused.
	if c := m.Config; c != nil && c.Size > p.cfg.MaxManifestSize {
		return Module{}, errdefs.New(errdefs.ErrTooLarge, ref.Original, nil,
			"config %s is %d bytes, over the limit of %d; an image config is a few KiB", c.Digest, c.Size, p.cfg.MaxManifestSize)
	}
	src, err := selectModule(m)
	if err != nil {
		return Module{}, errdefs.New(errdefs.ErrUnsupportedImage, ref.Original, err, "not a Wasm module in a known layout")
	}
	out := Module{Manifest: desc.Digest, Layer: src.Layer.Digest, Layout: src.Layout, Subjects: append([]ocispec.Descriptor{desc}, indexes...)}
	hs := &headerSink{Sink: sink, limit: p.cfg.MaxModuleSize}
	if err := p.copyLayer(ctx, repo, ref, src, hs); err != nil {
		return Module{}, err
	}
	if !hs.valid() {
		return Module{}, errdefs.New(errdefs.ErrInvalidModule, ref.Original, nil,
			"the module does not start with the Wasm magic and version (\\0asm 1); push a compiled .wasm binary")
	}
	out.Size = hs.n
	return out, nil
}

func (p *Puller) fetchManifest(ctx context.Context, repo *remote.Repository, ref Reference, desc ocispec.Descriptor) (*manifestDoc, error) {
	if desc.Size > p.cfg.MaxManifestSize {
		return nil, errdefs.New(errdefs.ErrTooLarge, ref.Original, nil, "manifest %s is %d bytes, over the limit of %d", desc.Digest, desc.Size, p.cfg.MaxManifestSize)
	}
	rc, err := repo.Manifests().Fetch(ctx, desc)
	if err != nil {
		return nil, classify(ref, err, "fetching manifest "+desc.Digest.String())
	}
	defer rc.Close()
	b, err := content.ReadAll(rc, desc)
	if err != nil {
		return nil, classify(ref, err, "reading manifest "+desc.Digest.String())
	}
	m, err := parseManifest(b)
	if err != nil {
		return nil, errdefs.New(errdefs.ErrUnsupportedImage, ref.Original, err, "manifest %s is not valid JSON", desc.Digest)
	}
	return m, nil
}

// copyLayer streams the layer through digest verification into sink. For a
// tar layer, only the module's bytes reach sink; the rest is read and dropped
// so the layer's digest can be checked.
func (p *Puller) copyLayer(ctx context.Context, repo *remote.Repository, ref Reference, src moduleSource, sink *headerSink) error {
	layer := src.Layer
	if !src.Tar && layer.Size > p.cfg.MaxModuleSize {
		return errdefs.New(errdefs.ErrTooLarge, ref.Original, nil, "module layer is %d bytes, over the limit of %d bytes; raise limits.maxModuleSize or shrink the module", layer.Size, p.cfg.MaxModuleSize)
	}
	// A tar layer may carry some overhead; a compressed one may expand.
	maxOut := p.cfg.MaxModuleSize*2 + 16<<20
	if src.Tar && layer.Size > maxOut {
		return errdefs.New(errdefs.ErrTooLarge, ref.Original, nil, "layer is %d bytes, over the limit of %d bytes", layer.Size, maxOut)
	}
	// The download's own context: cancelling it is what stops the
	// read-ahead goroutine in the middle of a Read. rc is closed only once
	// that goroutine is gone: oras' body wrapper is not safe to close
	// during a Read.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ps, progress := sink.Sink.(ProgressSink)
	if progress {
		ps.Started(layer)
	}
	rc, err := repo.Blobs().Fetch(ctx, layer)
	if err != nil {
		return classify(ref, err, "fetching layer "+layer.Digest.String())
	}
	if progress {
		rc = &progressBody{ReadCloser: rc, sink: ps}
	}
	// Read the network ahead so the download overlaps hashing and writing.
	ra := newReadAhead(rc, readAheadChunks, p.cfg.Buffers)
	defer func() {
		cancel() // unblocks the read-ahead goroutine first
		ra.Close()
		rc.Close()
	}()
	if ds, ok := sink.Sink.(DigestSink); ok && !src.Tar && layer.Digest.Algorithm() == digest.SHA256 {
		// The sink hashes what it stores; for a raw layer that is the
		// layer's own digest, so the bytes are hashed once, not twice.
		n, err := ra.WriteTo(sink)
		if err != nil {
			return p.copyError(ref, layer, err)
		}
		if n != layer.Size || ds.Digest() != layer.Digest {
			return p.copyError(ref, layer, content.ErrMismatchedDigest)
		}
		return nil
	}
	vr := content.NewVerifyReader(ra, layer)
	buf := p.cfg.Buffers.Get()
	defer p.cfg.Buffers.Put(buf)
	if !src.Tar {
		if _, err := io.CopyBuffer(sink, vr, buf); err != nil {
			return p.copyError(ref, layer, err)
		}
	} else {
		r, closeFn, err := decompress(vr, src.Compression, maxOut)
		if err != nil {
			return p.tarError(ref, layer, vr, buf, err)
		}
		defer closeFn()
		if _, err := extractFromTar(r, sink, p.cfg.MaxModuleSize, buf); err != nil {
			return p.tarError(ref, layer, vr, buf, err)
		}
		// Read what is left (tar padding, the compressor's trailer) so the
		// compressed stream is checked whole, then the layer's digest.
		if _, err := io.CopyBuffer(io.Discard, r, buf); err != nil {
			return p.tarError(ref, layer, vr, buf, err)
		}
		if _, err := io.CopyBuffer(io.Discard, vr, buf); err != nil {
			return p.copyError(ref, layer, err)
		}
	}
	if err := vr.Verify(); err != nil {
		return p.copyError(ref, layer, err)
	}
	return nil
}

// tarError classifies a failure to decompress or untar a layer. Bytes
// corrupted in flight fail there before the layer's digest is checked, so the
// rest of the layer is read and its digest checked first: a mismatch is the
// registry's fault (retried), a layer that matches and does not unpack is
// the image's.
func (p *Puller) tarError(ref Reference, layer ocispec.Descriptor, vr *content.VerifyReader, buf []byte, err error) error {
	var se *sizeError
	var pe *errdefs.Error
	var ske *sinkError
	if errors.As(err, &pe) || errors.As(err, &se) || errors.As(err, &ske) || errors.Is(err, errLayerTooLarge) {
		return p.copyError(ref, layer, err)
	}
	if _, derr := io.CopyBuffer(io.Discard, vr, buf); derr != nil {
		return p.copyError(ref, layer, derr)
	}
	if verr := vr.Verify(); verr != nil {
		return p.copyError(ref, layer, verr)
	}
	return errdefs.New(errdefs.ErrUnsupportedImage, ref.Original, err, "cannot take the module out of layer %s", layer.Digest)
}

// copyError classifies a failure while a layer streamed. A sink's error is
// returned as the sink made it.
func (p *Puller) copyError(ref Reference, layer ocispec.Descriptor, err error) error {
	var se *sizeError
	var pe *errdefs.Error
	var ske *sinkError
	switch {
	case errors.As(err, &ske):
		return ske.err
	case errors.As(err, &pe):
		return err
	case errors.As(err, &se):
		return errdefs.New(errdefs.ErrTooLarge, ref.Original, nil, "%s; raise limits.maxModuleSize or shrink the module", se.Error())
	case errors.Is(err, errLayerTooLarge):
		return errdefs.New(errdefs.ErrTooLarge, ref.Original, nil, "layer %s expands past %d bytes (a decompression bomb?); refused", layer.Digest, p.cfg.MaxModuleSize*2+16<<20)
	case errors.Is(err, content.ErrMismatchedDigest), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, content.ErrTrailingData):
		return errdefs.New(errdefs.ErrUnavailable, ref.Original, err, "layer %s did not match its digest; nothing was stored, the pull will be retried", layer.Digest)
	case isNetworkError(err):
		return classify(ref, err, "downloading layer "+layer.Digest.String())
	}
	return errdefs.New(errdefs.ErrUnsupportedImage, ref.Original, err, "cannot take the module out of layer %s", layer.Digest)
}

func isNetworkError(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)
}

// classify maps a registry client error to a sentinel with a useful message.
func classify(ref Reference, err error, doing string) error {
	var resp *errcode.ErrorResponse
	var blocked *blockedError
	var idle *idleError
	switch {
	case errors.As(err, &blocked):
		return errdefs.New(errdefs.ErrBlockedAddress, ref.Original, nil, "%s", blockedMessage(ref, blocked, doing))
	case errors.As(err, &idle):
		return errdefs.New(errdefs.ErrUnavailable, ref.Original, nil, "%s: %s; the pull will be retried", doing, idle.Error())
	case errors.Is(err, errdef.ErrNotFound):
		return errdefs.New(errdefs.ErrNotFound, ref.Original, nil, "%s: not found in %s; check the repository, tag or digest exist", doing, ref.Registry)
	case errors.As(err, &resp):
		switch {
		case resp.StatusCode == http.StatusNotFound:
			return errdefs.New(errdefs.ErrNotFound, ref.Original, nil, "%s: not found in %s; check the repository, tag or digest exist", doing, ref.Registry)
		case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
			return errdefs.New(errdefs.ErrUnauthorized, ref.Original, nil, "%s: %s answered %d; give the pod an imagePullSecret or the node a --docker-config the registry accepts", doing, ref.Registry, resp.StatusCode)
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			return errdefs.New(errdefs.ErrUnavailable, ref.Original, nil, "%s: %s answered %d; the pull will be retried", doing, ref.Registry, resp.StatusCode)
		}
		return errdefs.New(errdefs.ErrUnavailable, ref.Original, nil, "%s: %s answered %d %s", doing, ref.Registry, resp.StatusCode, strings.TrimSpace(http.StatusText(resp.StatusCode)))
	case errors.Is(err, auth.ErrBasicCredentialNotFound):
		return errdefs.New(errdefs.ErrUnauthorized, ref.Original, nil, "%s: %s asks for credentials and none were found; give the pod an imagePullSecret or the node a --docker-config", doing, ref.Registry)
	case errors.Is(err, content.ErrMismatchedDigest), errors.Is(err, content.ErrTrailingData):
		return errdefs.New(errdefs.ErrUnavailable, ref.Original, err, "%s: the registry sent bytes that do not match their digest", doing)
	case errors.Is(err, context.DeadlineExceeded):
		return errdefs.New(errdefs.ErrUnavailable, ref.Original, err, "%s: %s did not answer in time", doing, ref.Registry)
	case errors.Is(err, context.Canceled):
		return errdefs.New(errdefs.ErrUnavailable, ref.Original, err, "%s: cancelled", doing)
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		// net/http's words; there is no error value to test for.
		return errdefs.New(errdefs.ErrUnavailable, ref.Original, err, "%s: %s answers plain HTTP, not HTTPS; if it is meant to be reached without TLS, name it with --insecure-registry=%s", doing, ref.Registry, ref.Registry)
	}
	return errdefs.New(errdefs.ErrUnavailable, ref.Original, err, "%s: cannot reach %s; check the registry is up and reachable from the node", doing, ref.Registry)
}
