package puller

import (
	"errors"
	"fmt"
	"strings"

	"github.com/opencontainers/go-digest"
	"oras.land/oras-go/v2/registry"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/hostsconf"
)

// Reference is a parsed, normalised image reference.
type Reference struct {
	// Registry is the host[:port] of the registry ("docker.io" for Docker Hub).
	Registry string
	// Repository is the repository path within the registry.
	Repository string
	// Tag is set when the reference names a tag ("latest" when none was given
	// and there is no digest).
	Tag string
	// Digest is set when the reference names a manifest digest.
	Digest digest.Digest
	// Original is the string the user wrote.
	Original string
	// Endpoint is set on a source configured by the container runtime's
	// files (see Puller.Sources): how that host is reached and what it may
	// serve. Nil for the image as named and for registries.mirrors.
	Endpoint *hostsconf.Endpoint
}

// Limits of the distribution reference grammar, checked before anything
// else so an oversized reference never reaches a registry.
const (
	// MaxNameLength is the longest registry/repository name the grammar
	// allows (distribution's NameTotalLengthMax), counted after
	// normalisation ("nginx" is docker.io/library/nginx).
	MaxNameLength = 255
	// MaxReferenceLength bounds the whole reference as written: a name of
	// MaxNameLength, a 128-character tag and a sha512 digest, with room
	// for an "oci://" prefix and spaces.
	MaxReferenceLength = 640
)

// ParseReference parses an image reference as users write it in a pod spec:
// "ghcr.io/acme/filter:1.0", "...@sha256:...", an optional "oci://" prefix,
// and Docker Hub short names ("envoyproxy/wasm", "busybox"). A reference
// longer than the grammar allows is errdefs.ErrInvalidReference, and its error
// names only the start of it.
func ParseReference(s string) (Reference, error) {
	orig := s
	if len(s) > MaxReferenceLength {
		return Reference{}, errdefs.New(errdefs.ErrInvalidReference, abbreviate(orig), nil,
			"the reference is %d bytes; an image reference is at most %d (a name of up to %d characters, a tag of up to 128, a digest)",
			len(orig), MaxReferenceLength, MaxNameLength)
	}
	s = strings.TrimSpace(s)
	s = strings.TrimPrefix(s, "oci://")
	if s == "" {
		msg := "empty reference; set the volume attribute image to a reference like registry.example.com/repo/module:tag"
		if orig == "" {
			// errdefs.Error names the image only when there is one: name
			// the empty input here, as the message always has.
			msg = "image : " + msg
		}
		return Reference{}, errdefs.New(errdefs.ErrInvalidReference, orig, nil, "%s", msg)
	}
	s = normaliseDockerHub(s)
	// A reference may carry both a tag and a digest ("repo:tag@sha256:..."):
	// the digest wins, as in kubelet.
	name, dgst, hasDigest := strings.Cut(s, "@")
	if hasDigest {
		if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
			name = name[:i]
		}
		s = name + "@" + dgst
	}
	r, err := registry.ParseReference(s)
	if err == nil && r.Reference == "" && (strings.HasSuffix(s, ":") || strings.HasSuffix(s, "@")) {
		// "repo:" or "repo@" (an empty templated tag or digest) is a
		// mistake, not a request for :latest.
		err = errors.New("empty tag or digest after the last : or @")
	}
	if err != nil {
		return Reference{}, errdefs.New(errdefs.ErrInvalidReference, orig, err, "cannot parse the image reference; use the form registry.example.com/repo/module:tag or @sha256:<digest>")
	}
	ref := Reference{Registry: r.Registry, Repository: r.Repository, Original: orig}
	if n := len(ref.Name()); n > MaxNameLength {
		return Reference{}, errdefs.New(errdefs.ErrInvalidReference, abbreviate(orig), nil,
			"the name %s is %d characters; the distribution grammar allows at most %d", abbreviate(ref.Name()), n, MaxNameLength)
	}
	if d, err := r.Digest(); err == nil {
		ref.Digest = d
	} else if r.Reference != "" {
		ref.Tag = r.Reference
	} else {
		ref.Tag = "latest"
	}
	return ref, nil
}

// abbreviate shortens an oversized reference for messages, logs and
// events: its first 64 bytes and its length.
func abbreviate(s string) string {
	const keep = 64
	if len(s) <= keep {
		return s
	}
	return fmt.Sprintf("%q... (%d bytes)", strings.ToValidUTF8(s[:keep], ""), len(s))
}

// normaliseDockerHub expands Docker Hub short names the way Docker does:
// "busybox" -> "docker.io/library/busybox", "acme/x" -> "docker.io/acme/x".
func normaliseDockerHub(s string) string {
	first, rest, hasSlash := strings.Cut(s, "/")
	if first == "docker.io" && hasSlash && !strings.Contains(rest, "/") {
		// "docker.io/busybox" is Docker Hub's official image, as in Docker
		// and kubelet: the registry serves it only as library/busybox.
		return "docker.io/library/" + rest
	}
	if hasSlash && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return s
	}
	if !hasSlash {
		return "docker.io/library/" + s
	}
	return "docker.io/" + first + "/" + rest
}

// String is the canonical form: registry/repository:tag or @digest.
func (r Reference) String() string {
	if r.Digest != "" {
		return r.Registry + "/" + r.Repository + "@" + r.Digest.String()
	}
	return r.Registry + "/" + r.Repository + ":" + r.Tag
}

// Name is registry/repository without tag or digest.
func (r Reference) Name() string { return r.Registry + "/" + r.Repository }

// ByDigest returns the reference to the same repository at digest d.
func (r Reference) ByDigest(d digest.Digest) Reference {
	return Reference{Registry: r.Registry, Repository: r.Repository, Digest: d, Original: r.Original}
}

// IsLatest reports whether the reference is a tag named "latest" (given or
// implied), for which the default pull policy is Always.
func (r Reference) IsLatest() bool { return r.Digest == "" && r.Tag == "latest" }

// Host returns the host name of the registry without the port.
func (r Reference) Host() string {
	h := r.Registry
	if strings.HasPrefix(h, "[") {
		if i := strings.Index(h, "]"); i > 0 {
			return h[1:i]
		}
	}
	if i := strings.LastIndex(h, ":"); i >= 0 {
		return h[:i]
	}
	return h
}
