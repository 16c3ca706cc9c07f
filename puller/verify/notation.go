package verify

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"

	"github.com/notaryproject/notation-go"
	nverifier "github.com/notaryproject/notation-go/verifier"
	"github.com/notaryproject/notation-go/verifier/trustpolicy"
	"github.com/notaryproject/notation-go/verifier/truststore"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	// The envelope formats notation signs with.
	_ "github.com/notaryproject/notation-core-go/signature/cose"
	_ "github.com/notaryproject/notation-core-go/signature/jws"
)

// notationStore is the one trust store each policy's verifier has.
const notationStore = "wasm-csi"

// notationPolicy is a notation-go verifier for one policy: its trusted
// certificates as an in-memory CA trust store, its identities, the strict
// level with revocation checks skipped (they need OCSP and CRL servers the
// node may not reach; the README says so).
type notationPolicy struct {
	verifier notation.Verifier
}

func compileNotation(name string, n *NotationSpec, opts Options) (*notationPolicy, error) {
	if len(n.TrustedCertificates) == 0 {
		return nil, errors.New("trustedCertificates: empty")
	}
	if len(n.TrustedIdentities) == 0 {
		return nil, errors.New(`trustedIdentities: empty; name the signers ("x509.subject: CN=...") or "*"`)
	}
	var certs []*x509.Certificate
	for i, c := range n.TrustedCertificates {
		b, err := c.read(opts, maxPEMFileSize)
		if err != nil {
			return nil, fmt.Errorf("trustedCertificates[%d]: %w", i, err)
		}
		cs, err := parseCertificates(b)
		if err != nil {
			return nil, fmt.Errorf("trustedCertificates[%d]: %w", i, err)
		}
		certs = append(certs, cs...)
	}
	doc := &trustpolicy.Document{
		Version: "1.0",
		TrustPolicies: []trustpolicy.TrustPolicy{{
			Name:           "wasm-csi",
			RegistryScopes: []string{"*"},
			SignatureVerification: trustpolicy.SignatureVerification{
				VerificationLevel: trustpolicy.LevelStrict.Name,
				Override:          map[trustpolicy.ValidationType]trustpolicy.ValidationAction{trustpolicy.TypeRevocation: trustpolicy.ActionSkip},
			},
			TrustStores:       []string{string(truststore.TypeCA) + ":" + notationStore},
			TrustedIdentities: n.TrustedIdentities,
		}},
	}
	v, err := nverifier.NewWithOptions(doc, memoryTrustStore(certs), nil, nverifier.VerifierOptions{})
	if err != nil {
		return nil, fmt.Errorf("trustedIdentities: %w", err)
	}
	return &notationPolicy{verifier: v}, nil
}

// memoryTrustStore is the policy's certificates as notation's trust store.
type memoryTrustStore []*x509.Certificate

func (m memoryTrustStore) GetCertificates(_ context.Context, t truststore.Type, named string) ([]*x509.Certificate, error) {
	if t != truststore.TypeCA || named != notationStore {
		return nil, fmt.Errorf("no trust store %s:%s", t, named)
	}
	return m, nil
}

// check verifies one envelope over subject with notation-go.
func (n *notationPolicy) check(ctx context.Context, image string, subject ocispec.Descriptor, s NotarySignature) (signer, reason string) {
	ref := image + "@" + subject.Digest.String()
	out, err := n.verifier.Verify(ctx, subject, s.Envelope, notation.VerifierVerifyOptions{
		ArtifactReference:  ref,
		SignatureMediaType: s.MediaType,
	})
	if err != nil {
		msg := err.Error()
		switch {
		case strings.Contains(msg, "content descriptor mismatch"):
			return "", "a signature for another digest"
		case strings.Contains(msg, "trusted identit"):
			return "", "a certificate of another identity: " + msg
		case strings.Contains(msg, "trust store") || strings.Contains(msg, "authenticity"):
			return "", "not signed by a certificate the policy trusts: " + msg
		}
		return "", msg
	}
	if out != nil && out.EnvelopeContent != nil && len(out.EnvelopeContent.SignerInfo.CertificateChain) > 0 {
		return out.EnvelopeContent.SignerInfo.CertificateChain[0].Subject.String(), ""
	}
	return "notation signer", ""
}
