package verify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/errdef"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote/errcode"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Media and artifact types of the signatures this package reads.
const (
	cosignPayloadType   = "application/vnd.dev.cosign.simplesigning.v1+json"
	cosignSigAnnotation = "dev.cosignproject.cosign/signature"
	cosignCertAnno      = "dev.sigstore.cosign/certificate"
	cosignChainAnno     = "dev.sigstore.cosign/chain"
	cosignBundleAnno    = "dev.sigstore.cosign/bundle"
	bundleTypePrefix    = "application/vnd.dev.sigstore.bundle"
	notaryArtifactType  = "application/vnd.cncf.notary.signature"
)

// Defaults for Limits.
const (
	DefaultMaxSignatures   = 16
	DefaultMaxManifestSize = 256 << 10
	DefaultMaxBlobSize     = 256 << 10
	DefaultMaxReferrers    = 20000
)

// Limits bound what Collect reads from a registry for one image.
type Limits struct {
	// MaxSignatures is how many signatures (of every form, for every
	// digest) are read and tried at most (default 16). More are counted,
	// not read.
	MaxSignatures int
	// MaxManifestSize caps a signature manifest (default 256 KiB). The
	// referrers index is capped by the repository's own metadata limit.
	MaxManifestSize int64
	// MaxBlobSize caps a payload, bundle or envelope (default 256 KiB).
	MaxBlobSize int64
	// MaxReferrers is how many referrers of a digest are looked at at most
	// (default 20000); a listing longer than that is cut there.
	MaxReferrers int
}

func (l Limits) withDefaults() Limits {
	if l.MaxSignatures <= 0 {
		l.MaxSignatures = DefaultMaxSignatures
	}
	if l.MaxManifestSize <= 0 {
		l.MaxManifestSize = DefaultMaxManifestSize
	}
	if l.MaxBlobSize <= 0 {
		l.MaxBlobSize = DefaultMaxBlobSize
	}
	if l.MaxReferrers <= 0 {
		l.MaxReferrers = DefaultMaxReferrers
	}
	return l
}

// Repository is what Collect needs of a registry repository; oras-go's
// *remote.Repository is one (its Referrers falls back to the referrers tag
// when the registry has no referrers API).
type Repository interface {
	Manifests() registry.ManifestStore
	Blobs() registry.BlobStore
	Referrers(ctx context.Context, desc ocispec.Descriptor, artifactType string, fn func(referrers []ocispec.Descriptor) error) error
}

// Evidence is every signature collected for an image: what Check needs,
// kept so that the image can be checked again without its registry.
type Evidence struct {
	// Subjects are the manifests signatures were looked for: the one the
	// module came from and the index it was chosen from, if any.
	Subjects []ocispec.Descriptor `json:"subjects"`
	Cosign   []CosignSignature    `json:"cosign,omitempty"`
	Bundles  []SigstoreBundle     `json:"bundles,omitempty"`
	Notation []NotarySignature    `json:"notation,omitempty"`
	// Skipped counts signatures found and not read: over the limit on
	// signatures, over a size cap, or no longer in the registry.
	Skipped int `json:"skipped,omitempty"`
	// Notes say why (at most a few lines).
	Notes []string `json:"notes,omitempty"`
}

// CosignSignature is one layer of cosign's `sha256-<hex>.sig` manifest.
type CosignSignature struct {
	Subject     digest.Digest `json:"subject"`
	Payload     []byte        `json:"payload"`
	Signature   string        `json:"signature"`
	Certificate string        `json:"certificate,omitempty"`
	Chain       string        `json:"chain,omitempty"`
	RekorBundle string        `json:"rekorBundle,omitempty"`
}

// SigstoreBundle is a Sigstore bundle attached as a referrer.
type SigstoreBundle struct {
	Subject digest.Digest `json:"subject"`
	Bundle  []byte        `json:"bundle"`
}

// NotarySignature is a Notary Project signature envelope attached as a
// referrer.
type NotarySignature struct {
	Subject   digest.Digest `json:"subject"`
	MediaType string        `json:"mediaType"`
	Envelope  []byte        `json:"envelope"`
}

// Count is how many signatures the evidence holds.
func (e *Evidence) Count() int {
	return len(e.Cosign) + len(e.Bundles) + len(e.Notation)
}

func (e *Evidence) note(format string, args ...any) {
	if len(e.Notes) < 8 {
		e.Notes = append(e.Notes, fmt.Sprintf(format, args...))
	}
}

// errStop ends a referrers listing early.
var errStop = errors.New("stop listing")

// Collect reads every signature of subjects the registry holds, within lim.
// A registry that cannot be asked returns an error wrapping
// errdefs.ErrUnavailable;
// an image with no signature is not an error (the Evidence is empty).
func Collect(ctx context.Context, repo Repository, subjects []ocispec.Descriptor, lim Limits) (*Evidence, error) {
	lim = lim.withDefaults()
	ev := &Evidence{Subjects: subjects}
	budget := lim.MaxSignatures
	for _, s := range subjects {
		if err := collectCosign(ctx, repo, s, lim, ev, &budget); err != nil {
			return nil, err
		}
	}
	for _, s := range subjects {
		if err := collectReferrers(ctx, repo, s, lim, ev, &budget); err != nil {
			return nil, err
		}
	}
	return ev, nil
}

// cosignTag is where cosign puts the signatures of d.
func cosignTag(d digest.Digest) string {
	return d.Algorithm().String() + "-" + d.Encoded() + ".sig"
}

type manifest struct {
	MediaType    string               `json:"mediaType"`
	ArtifactType string               `json:"artifactType"`
	Config       ocispec.Descriptor   `json:"config"`
	Layers       []ocispec.Descriptor `json:"layers"`
	Subject      *ocispec.Descriptor  `json:"subject"`
}

func collectCosign(ctx context.Context, repo Repository, subject ocispec.Descriptor, lim Limits, ev *Evidence, budget *int) error {
	tag := cosignTag(subject.Digest)
	desc, rc, err := repo.Manifests().FetchReference(ctx, tag)
	if err != nil {
		if isNotFound(err) {
			return nil
		}
		return unavailable(err, "fetching cosign signatures (tag %s)", tag)
	}
	defer rc.Close()
	if desc.Size > lim.MaxManifestSize {
		ev.Skipped++
		ev.note("cosign signature manifest %s is %d bytes, over the cap of %d; not read", tag, desc.Size, lim.MaxManifestSize)
		return nil
	}
	b, err := content.ReadAll(rc, desc)
	if err != nil {
		return unavailable(err, "reading cosign signature manifest %s", tag)
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		ev.Skipped++
		ev.note("cosign signature manifest %s is not JSON", tag)
		return nil
	}
	for _, l := range m.Layers {
		sig := l.Annotations[cosignSigAnnotation]
		if l.MediaType != cosignPayloadType || sig == "" {
			continue
		}
		if *budget <= 0 {
			ev.Skipped++
			continue
		}
		*budget--
		payload, ok, err := fetchBlob(ctx, repo, l, lim, ev)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		ev.Cosign = append(ev.Cosign, CosignSignature{
			Subject:     subject.Digest,
			Payload:     payload,
			Signature:   sig,
			Certificate: l.Annotations[cosignCertAnno],
			Chain:       l.Annotations[cosignChainAnno],
			RekorBundle: l.Annotations[cosignBundleAnno],
		})
	}
	if ev.Skipped > 0 {
		ev.note("more signatures than the %d read", lim.MaxSignatures)
	}
	return nil
}

func collectReferrers(ctx context.Context, repo Repository, subject ocispec.Descriptor, lim Limits, ev *Evidence, budget *int) error {
	var candidates []ocispec.Descriptor
	seen := 0
	err := repo.Referrers(ctx, subject, "", func(refs []ocispec.Descriptor) error {
		for _, r := range refs {
			seen++
			if seen > lim.MaxReferrers {
				ev.note("more than %d referrers of %s; the rest were not looked at", lim.MaxReferrers, subject.Digest)
				return errStop
			}
			if !maybeSignature(r.ArtifactType) {
				continue
			}
			if len(candidates) >= *budget {
				ev.Skipped++
				continue
			}
			candidates = append(candidates, r)
		}
		return nil
	})
	if err != nil && !errors.Is(err, errStop) {
		if isNotFound(err) {
			return nil
		}
		return unavailable(err, "listing the referrers of %s", subject.Digest)
	}
	for _, c := range candidates {
		*budget--
		if err := collectReferrer(ctx, repo, subject, c, lim, ev); err != nil {
			return err
		}
	}
	return nil
}

func collectReferrer(ctx context.Context, repo Repository, subject, desc ocispec.Descriptor, lim Limits, ev *Evidence) error {
	if desc.Size > lim.MaxManifestSize {
		ev.Skipped++
		ev.note("referrer %s is %d bytes, over the cap of %d; not read", desc.Digest, desc.Size, lim.MaxManifestSize)
		return nil
	}
	rc, err := repo.Manifests().Fetch(ctx, desc)
	if err != nil {
		if isNotFound(err) {
			ev.Skipped++
			ev.note("referrer %s is listed but not in the registry", desc.Digest)
			return nil
		}
		return unavailable(err, "fetching referrer %s", desc.Digest)
	}
	b, err := content.ReadAll(rc, desc)
	rc.Close()
	if err != nil {
		if errors.Is(err, content.ErrMismatchedDigest) || errors.Is(err, content.ErrTrailingData) || errors.Is(err, io.ErrUnexpectedEOF) {
			ev.Skipped++
			ev.note("referrer %s does not match its digest", desc.Digest)
			return nil
		}
		return unavailable(err, "reading referrer %s", desc.Digest)
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil || len(m.Layers) == 0 {
		ev.Skipped++
		ev.note("referrer %s is not a signature manifest", desc.Digest)
		return nil
	}
	// The referrers tag is an index anyone with push rights edits: only a
	// manifest whose own subject is this digest counts.
	if m.Subject == nil || m.Subject.Digest != subject.Digest {
		ev.Skipped++
		ev.note("referrer %s names another subject", desc.Digest)
		return nil
	}
	l := m.Layers[0]
	isBundle := strings.HasPrefix(m.ArtifactType, bundleTypePrefix) || strings.HasPrefix(l.MediaType, bundleTypePrefix)
	isNotary := m.ArtifactType == notaryArtifactType || m.Config.MediaType == notaryArtifactType
	if !isBundle && !isNotary {
		ev.Skipped++
		ev.note("referrer %s is not a signature (%s)", desc.Digest, m.ArtifactType)
		return nil
	}
	blob, ok, err := fetchBlob(ctx, repo, l, lim, ev)
	if err != nil || !ok {
		return err
	}
	if isBundle {
		ev.Bundles = append(ev.Bundles, SigstoreBundle{Subject: subject.Digest, Bundle: blob})
	} else {
		ev.Notation = append(ev.Notation, NotarySignature{Subject: subject.Digest, MediaType: l.MediaType, Envelope: blob})
	}
	return nil
}

// maybeSignature reports whether a referrer of this artifact type may be a
// signature: a Sigstore bundle, a Notary Project signature, or a manifest
// that names no type of its own (cosign's bundle referrers are listed with
// the empty config's type).
func maybeSignature(artifactType string) bool {
	switch {
	case strings.HasPrefix(artifactType, bundleTypePrefix), artifactType == notaryArtifactType,
		artifactType == "", artifactType == ocispec.MediaTypeEmptyJSON:
		return true
	}
	return false
}

// fetchBlob reads a small blob under the cap. ok is false (and the blob
// counted as skipped) when it is over the cap or missing.
func fetchBlob(ctx context.Context, repo Repository, desc ocispec.Descriptor, lim Limits, ev *Evidence) ([]byte, bool, error) {
	if desc.Size > lim.MaxBlobSize || desc.Size < 0 {
		ev.Skipped++
		ev.note("signature blob %s is %d bytes, over the cap of %d; not read", desc.Digest, desc.Size, lim.MaxBlobSize)
		return nil, false, nil
	}
	rc, err := repo.Blobs().Fetch(ctx, desc)
	if err != nil {
		if isNotFound(err) {
			ev.Skipped++
			ev.note("signature blob %s is not in the registry", desc.Digest)
			return nil, false, nil
		}
		return nil, false, unavailable(err, "fetching signature blob %s", desc.Digest)
	}
	defer rc.Close()
	b, err := content.ReadAll(rc, desc)
	if err != nil {
		if errors.Is(err, content.ErrMismatchedDigest) || errors.Is(err, content.ErrTrailingData) {
			ev.Skipped++
			ev.note("signature blob %s does not match its digest", desc.Digest)
			return nil, false, nil
		}
		return nil, false, unavailable(err, "reading signature blob %s", desc.Digest)
	}
	return b, true, nil
}

func isNotFound(err error) bool {
	var resp *errcode.ErrorResponse
	return errors.Is(err, errdef.ErrNotFound) || (errors.As(err, &resp) && resp.StatusCode == http.StatusNotFound)
}

// RegistryError is a registry that could not be asked for signatures.
type RegistryError struct {
	Doing string
	Cause error
}

func (e *RegistryError) Error() string {
	return fmt.Sprintf("%s: %v; the registry could not be asked for signatures, the publish will be retried", e.Doing, e.Cause)
}

// Unwrap makes a RegistryError an errdefs.ErrUnavailable (kubelet retries).
func (e *RegistryError) Unwrap() []error { return []error{errdefs.ErrUnavailable, e.Cause} }

func unavailable(err error, format string, args ...any) error {
	return &RegistryError{Doing: fmt.Sprintf(format, args...), Cause: err}
}
