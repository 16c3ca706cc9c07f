package verify

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"github.com/sigstore/sigstore-go/pkg/root"
	sgverify "github.com/sigstore/sigstore-go/pkg/verify"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"github.com/sigstore/sigstore/pkg/signature"
)

// Spec is the config file's `verification` section, as written.
type Spec struct {
	// Unmatched is "allow" (the default) or "deny": what happens to an
	// image no policy matches.
	Unmatched string `json:"unmatched,omitempty"`
	// Policies are tried in order; the first whose images match decides.
	Policies []PolicySpec `json:"policies,omitempty"`
}

// PolicySpec is one policy as written.
type PolicySpec struct {
	Name     string        `json:"name"`
	Images   []string      `json:"images"`
	Mode     string        `json:"mode,omitempty"`
	Cosign   *CosignSpec   `json:"cosign,omitempty"`
	Notation *NotationSpec `json:"notation,omitempty"`
}

// CosignSpec is what a policy trusts of cosign's signatures.
type CosignSpec struct {
	Keys        []PEMSource    `json:"keys,omitempty"`
	Keyless     []IdentitySpec `json:"keyless,omitempty"`
	TrustedRoot string         `json:"trustedRoot,omitempty"`
	IgnoreTlog  bool           `json:"ignoreTlog,omitempty"`
}

// IdentitySpec is a Fulcio certificate identity: the OIDC issuer and the
// subject, exactly or by a regular expression.
type IdentitySpec struct {
	Issuer        string `json:"issuer"`
	Subject       string `json:"subject,omitempty"`
	SubjectRegExp string `json:"subjectRegExp,omitempty"`
}

// NotationSpec is what a policy trusts of Notary Project signatures.
type NotationSpec struct {
	TrustedCertificates []PEMSource `json:"trustedCertificates,omitempty"`
	TrustedIdentities   []string    `json:"trustedIdentities,omitempty"`
}

// PEMSource is PEM text given inline or the path of a file holding it.
type PEMSource struct {
	PEM  string `json:"pem,omitempty"`
	File string `json:"file,omitempty"`
}

// Mode says what a failed verification does.
type Mode string

const (
	// Enforce refuses the image.
	Enforce Mode = "enforce"
	// Warn serves it, with a Warning event and a metric.
	Warn Mode = "warn"
)

// Limits on what files a policy names may hold.
const (
	maxPEMFileSize         = 1 << 20
	maxTrustedRootFileSize = 4 << 20
)

// Options tells Compile how to match image patterns and read files.
type Options struct {
	// NewMatcher compiles a policy's `images` patterns (the same grammar as
	// registries.allowed) into a test of a normalised registry host[:port]
	// and repository.
	NewMatcher func(patterns []string) (func(registry, repository string) bool, error)
	// ReadFile reads a file a policy names (default os.ReadFile with a size
	// cap).
	ReadFile func(path string, limit int64) ([]byte, error)
}

// Policies is a compiled verification section.
type Policies struct {
	// DenyUnmatched refuses images no policy matches.
	DenyUnmatched bool
	list          []*Policy
}

// Policy is one compiled policy.
type Policy struct {
	Name string
	Mode Mode
	// Fingerprint changes when anything the policy trusts changes (its
	// spec, or a key, certificate or trusted root file it names): a
	// verification recorded under one fingerprint is not trusted under
	// another.
	Fingerprint string
	match       func(registry, repository string) bool

	keys        []signature.Verifier
	keyless     sgverify.CertificateIdentities
	identities  []IdentitySpec
	trustedRoot root.TrustedMaterial
	ignoreTlog  bool

	notation *notationPolicy
}

// Match returns the first policy whose images match the normalised
// registry (host[:port]) and repository (docker.io, library/nginx), or nil.
func (ps *Policies) Match(registry, repository string) *Policy {
	if ps == nil {
		return nil
	}
	for _, p := range ps.list {
		if p.match(registry, repository) {
			return p
		}
	}
	return nil
}

// Empty reports whether nothing is verified: no policy and unmatched allow.
func (ps *Policies) Empty() bool {
	return ps == nil || (len(ps.list) == 0 && !ps.DenyUnmatched)
}

// Names lists the policies in order.
func (ps *Policies) Names() []string {
	if ps == nil {
		return nil
	}
	out := make([]string, len(ps.list))
	for i, p := range ps.list {
		out[i] = p.Name
	}
	return out
}

var policyName = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9._-]{0,62}[a-zA-Z0-9])?$`)

// Compile checks spec and loads what it names (keys, certificates, the
// trusted root). Every error names the policy and key at fault.
func Compile(spec Spec, opts Options) (*Policies, error) {
	if opts.NewMatcher == nil {
		return nil, errors.New("verification: no image matcher")
	}
	if opts.ReadFile == nil {
		opts.ReadFile = readFileLimited
	}
	ps := &Policies{}
	switch spec.Unmatched {
	case "", "allow":
	case "deny":
		ps.DenyUnmatched = true
	default:
		return nil, fmt.Errorf("verification.unmatched: %q is neither allow nor deny", spec.Unmatched)
	}
	seen := map[string]bool{}
	for i, s := range spec.Policies {
		where := fmt.Sprintf("verification.policies[%d]", i)
		if !policyName.MatchString(s.Name) {
			return nil, fmt.Errorf("%s.name: %q is not a name (letters, digits, '.', '_', '-'; at most 64)", where, s.Name)
		}
		where = fmt.Sprintf("verification.policies[%d] (%s)", i, s.Name)
		if seen[s.Name] {
			return nil, fmt.Errorf("%s: a second policy with this name", where)
		}
		seen[s.Name] = true
		p, err := compilePolicy(s, opts)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		ps.list = append(ps.list, p)
	}
	return ps, nil
}

func compilePolicy(s PolicySpec, opts Options) (*Policy, error) {
	p := &Policy{Name: s.Name}
	h := sha256.New()
	spec, _ := json.Marshal(s)
	h.Write(spec)
	read := opts.ReadFile
	opts.ReadFile = func(path string, limit int64) ([]byte, error) {
		b, err := read(path, limit)
		h.Write(b)
		return b, err
	}
	defer func() { p.Fingerprint = hex.EncodeToString(h.Sum(nil)) }()
	switch s.Mode {
	case "", "enforce":
		p.Mode = Enforce
	case "warn":
		p.Mode = Warn
	default:
		return nil, fmt.Errorf("mode: %q is neither enforce nor warn", s.Mode)
	}
	if len(s.Images) == 0 {
		return nil, errors.New("images: empty; name the images this policy covers")
	}
	m, err := opts.NewMatcher(s.Images)
	if err != nil {
		return nil, fmt.Errorf("images: %w", err)
	}
	p.match = m
	if s.Cosign == nil && s.Notation == nil {
		return nil, errors.New("neither cosign nor notation: a policy must say whose signatures it trusts")
	}
	if c := s.Cosign; c != nil {
		if err := p.compileCosign(c, opts); err != nil {
			return nil, fmt.Errorf("cosign.%w", err)
		}
	}
	if n := s.Notation; n != nil {
		np, err := compileNotation(s.Name, n, opts)
		if err != nil {
			return nil, fmt.Errorf("notation.%w", err)
		}
		p.notation = np
	}
	return p, nil
}

func (p *Policy) compileCosign(c *CosignSpec, opts Options) error {
	if len(c.Keys) == 0 && len(c.Keyless) == 0 {
		return errors.New("keys: neither keys nor keyless identities given")
	}
	for i, k := range c.Keys {
		b, err := k.read(opts, maxPEMFileSize)
		if err != nil {
			return fmt.Errorf("keys[%d]: %w", i, err)
		}
		pub, err := cryptoutils.UnmarshalPEMToPublicKey(b)
		if err != nil {
			return fmt.Errorf("keys[%d]: not a PEM public key: %w", i, err)
		}
		if err := cryptoutils.ValidatePubKey(pub); err != nil {
			return fmt.Errorf("keys[%d]: %w", i, err)
		}
		v, err := signature.LoadDefaultVerifier(pub)
		if err != nil {
			return fmt.Errorf("keys[%d]: %w", i, err)
		}
		p.keys = append(p.keys, v)
	}
	for i, id := range c.Keyless {
		if id.Issuer == "" {
			return fmt.Errorf("keyless[%d].issuer: empty", i)
		}
		if (id.Subject == "") == (id.SubjectRegExp == "") {
			return fmt.Errorf("keyless[%d]: give exactly one of subject and subjectRegExp", i)
		}
		ci, err := sgverify.NewShortCertificateIdentity(id.Issuer, "", id.Subject, id.SubjectRegExp)
		if err != nil {
			return fmt.Errorf("keyless[%d]: %w", i, err)
		}
		p.keyless = append(p.keyless, ci)
		p.identities = append(p.identities, id)
	}
	if c.TrustedRoot != "" {
		b, err := opts.ReadFile(c.TrustedRoot, maxTrustedRootFileSize)
		if err != nil {
			return fmt.Errorf("trustedRoot: %w", err)
		}
		tr, err := root.NewTrustedRootFromJSON(b)
		if err != nil {
			return fmt.Errorf("trustedRoot: %s is not a Sigstore trusted root: %w", c.TrustedRoot, err)
		}
		p.trustedRoot = tr
	}
	if len(c.Keyless) > 0 && p.trustedRoot == nil {
		return errors.New("trustedRoot: required for keyless identities (the Fulcio CAs and Rekor keys to trust)")
	}
	if len(c.Keys) > 0 && !c.IgnoreTlog && p.trustedRoot == nil {
		return errors.New("trustedRoot: required to check the transparency-log proof of key signatures; give one, or set ignoreTlog: true")
	}
	p.ignoreTlog = c.IgnoreTlog
	return nil
}

func (s PEMSource) read(opts Options, limit int64) ([]byte, error) {
	switch {
	case s.PEM != "" && s.File != "":
		return nil, errors.New("give pem or file, not both")
	case s.PEM != "":
		return []byte(s.PEM), nil
	case s.File != "":
		return opts.ReadFile(s.File, limit)
	}
	return nil, errors.New("neither pem nor file")
}

func readFileLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is over %d bytes", path, limit)
	}
	return b, nil
}

// parseCertificates reads PEM certificates.
func parseCertificates(b []byte) ([]*x509.Certificate, error) {
	certs, err := cryptoutils.UnmarshalCertificatesFromPEMLimited(b, 64)
	if err != nil {
		return nil, err
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM certificate")
	}
	return certs, nil
}

// keyID names a key in results: its algorithm and a short fingerprint.
func keyID(v signature.Verifier) string {
	pub, err := v.PublicKey()
	if err != nil {
		return "key"
	}
	skid, err := cryptoutils.SKID(pub)
	if err != nil {
		return "key"
	}
	return fmt.Sprintf("key %s %x", keyAlg(pub), skid[:8])
}

func keyAlg(pub crypto.PublicKey) string {
	s := fmt.Sprintf("%T", pub)
	s = strings.TrimPrefix(s, "*")
	return strings.SplitN(s, ".", 2)[0]
}
