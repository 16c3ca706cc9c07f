package verify

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	protobundle "github.com/sigstore/protobuf-specs/gen/pb-go/bundle/v1"
	protocommon "github.com/sigstore/protobuf-specs/gen/pb-go/common/v1"
	protorekor "github.com/sigstore/protobuf-specs/gen/pb-go/rekor/v1"
	"github.com/sigstore/sigstore-go/pkg/bundle"
	"github.com/sigstore/sigstore-go/pkg/fulcio/certificate"
	"github.com/sigstore/sigstore-go/pkg/root"
	sgverify "github.com/sigstore/sigstore-go/pkg/verify"
	"github.com/sigstore/sigstore/pkg/signature/payload"

	"github.com/opencontainers/go-digest"
)

// cosignSignPredicate is the in-toto predicate type cosign gives the
// statement of an image signature in a Sigstore bundle; other predicates
// (attestations: SBOMs, provenance) are not signatures of the image.
const cosignSignPredicate = "https://sigstore.dev/cosign/sign/v1"

// bundleV01 is the media type the legacy signature is checked as: the one
// whose transparency-log entries carry a signed entry timestamp.
const bundleV01 = "application/vnd.dev.sigstore.bundle+json;version=0.1"

// checkCosignSignature checks one layer of a `.sig` manifest: its
// signature over the simple-signing payload by one of the policy's keys or
// identities (sigstore-go does the cryptography: signature, certificate
// chain, identity, transparency-log entry), then that the payload names the
// digest it was found for. reason is empty when it verified.
func (p *Policy) checkCosignSignature(s CosignSignature) (signer, reason string) {
	sig, err := base64.StdEncoding.DecodeString(s.Signature)
	if err != nil {
		return "", "the signature annotation is not base64"
	}
	sum := sha256.Sum256(s.Payload)
	pb := &protobundle.Bundle{
		MediaType: bundleV01,
		Content: &protobundle.Bundle_MessageSignature{MessageSignature: &protocommon.MessageSignature{
			MessageDigest: &protocommon.HashOutput{Algorithm: protocommon.HashAlgorithm_SHA2_256, Digest: sum[:]},
			Signature:     sig,
		}},
	}
	if s.RekorBundle != "" {
		tle, err := rekorBundleEntry(s.RekorBundle)
		if err != nil {
			return "", "its transparency-log bundle is unreadable: " + err.Error()
		}
		pb.VerificationMaterial = &protobundle.VerificationMaterial{TlogEntries: []*protorekor.TransparencyLogEntry{tle}}
	} else {
		pb.VerificationMaterial = &protobundle.VerificationMaterial{}
	}
	if s.Certificate != "" {
		certs, err := parseCertificates([]byte(s.Certificate))
		if err != nil {
			return "", "its certificate is unreadable: " + err.Error()
		}
		pb.VerificationMaterial.Content = &protobundle.VerificationMaterial_X509CertificateChain{X509CertificateChain: &protocommon.X509CertificateChain{
			Certificates: []*protocommon.X509Certificate{{RawBytes: certs[0].Raw}},
		}}
	} else {
		pb.VerificationMaterial.Content = &protobundle.VerificationMaterial_PublicKey{PublicKey: &protocommon.PublicKeyIdentifier{}}
	}
	b, err := bundle.NewBundle(pb)
	if err != nil {
		return "", "malformed: " + err.Error()
	}
	signer, reason = p.verifyEntity(b, func() sgverify.ArtifactPolicyOption {
		return sgverify.WithArtifact(bytes.NewReader(s.Payload))
	}, s.Certificate != "")
	if reason != "" {
		return "", reason
	}
	var pl payload.SimpleContainerImage
	if err := json.Unmarshal(s.Payload, &pl); err != nil {
		return "", "signed payload is not a simple-signing payload"
	}
	if got := digest.Digest(pl.Critical.Image.DockerManifestDigest); got != s.Subject {
		return "", fmt.Sprintf("a payload for another digest (%s, by %s); the signature was copied from another image", got, signer)
	}
	return signer, ""
}

// checkBundle checks a Sigstore bundle attached as a referrer: a DSSE
// envelope whose in-toto statement, of cosign's signature predicate, has
// the digest as subject.
func (p *Policy) checkBundle(sb SigstoreBundle) (signer, reason string) {
	var b bundle.Bundle
	if err := b.UnmarshalJSON(sb.Bundle); err != nil {
		return "", "not a Sigstore bundle: " + err.Error()
	}
	env, err := b.Envelope()
	if err != nil || env == nil {
		return "", "the bundle holds no DSSE statement about an image digest"
	}
	stmt, err := env.Statement()
	if err != nil {
		return "", "the bundle's statement is unreadable: " + err.Error()
	}
	if stmt.GetPredicateType() != cosignSignPredicate {
		return "", fmt.Sprintf("an attestation (%s), not a signature", stmt.GetPredicateType())
	}
	raw, err := hex.DecodeString(sb.Subject.Encoded())
	if err != nil || sb.Subject.Algorithm() != digest.SHA256 {
		return "", "unsupported digest"
	}
	signer, reason = p.verifyEntity(&b, func() sgverify.ArtifactPolicyOption {
		return sgverify.WithArtifactDigest("sha256", raw)
	}, b.VerificationMaterial.GetPublicKey() == nil)
	if reason != "" {
		// The statement was not verified, but it says why: one about
		// other digests is a bundle for another image.
		var subjects []string
		names := false
		for _, s := range stmt.GetSubject() {
			subjects = append(subjects, "sha256:"+s.GetDigest()["sha256"])
			names = names || s.GetDigest()["sha256"] == sb.Subject.Encoded()
		}
		if !names {
			return "", fmt.Sprintf("a bundle for another digest (%s)", strings.Join(subjects, ", "))
		}
		return "", reason
	}
	return signer, ""
}

// verifyEntity runs sigstore-go's verifier once per key (a key-signed
// entity) or once with the policy's identities (a certificate). artifact
// makes a fresh artifact option per run (a reader is consumed by one).
func (p *Policy) verifyEntity(e sgverify.SignedEntity, artifact func() sgverify.ArtifactPolicyOption, withCert bool) (signer, reason string) {
	if withCert {
		if len(p.keyless) == 0 {
			return "", "signed with a certificate, and this policy trusts keys only"
		}
		// The log proof is required; the time the certificate is checked at
		// is the log's (signed entry timestamp) or a timestamp authority's.
		opts := []sgverify.VerifierOption{sgverify.WithTransparencyLog(1), sgverify.WithObserverTimestamps(1)}
		if len(p.trustedRoot.CTLogs()) > 0 {
			opts = append(opts, sgverify.WithSignedCertificateTimestamps(1))
		}
		v, err := sgverify.NewVerifier(p.trustedRoot, opts...)
		if err != nil {
			return "", err.Error()
		}
		var popts []sgverify.PolicyOption
		for _, id := range p.keyless {
			popts = append(popts, sgverify.WithCertificateIdentity(id))
		}
		res, err := v.Verify(e, sgverify.NewPolicy(artifact(), popts...))
		if err != nil {
			return "", p.certReason(e, err)
		}
		if res.Signature != nil && res.Signature.Certificate != nil {
			c := res.Signature.Certificate
			return fmt.Sprintf("%s (issuer %s)", c.SubjectAlternativeName, c.Issuer), ""
		}
		return "certificate", ""
	}
	if len(p.keys) == 0 {
		return "", "signed with a key, and this policy trusts keyless identities only"
	}
	var last error
	for _, k := range p.keys {
		km := root.NewTrustedPublicKeyMaterial(func(string) (root.TimeConstrainedVerifier, error) {
			return root.NewExpiringKey(k, time.Time{}, time.Time{}), nil
		})
		var tm root.TrustedMaterial = km
		var opts []sgverify.VerifierOption
		if p.ignoreTlog {
			opts = append(opts, sgverify.WithNoObserverTimestamps())
		} else {
			tm = root.TrustedMaterialCollection{p.trustedRoot, km}
			opts = append(opts, sgverify.WithTransparencyLog(1), sgverify.WithObserverTimestamps(1))
		}
		v, err := sgverify.NewVerifier(tm, opts...)
		if err != nil {
			return "", err.Error()
		}
		if _, err = v.Verify(e, sgverify.NewPolicy(artifact(), sgverify.WithKey())); err == nil {
			return keyID(k), ""
		}
		last = err
	}
	return "", keyReason(e, last, p.ignoreTlog)
}

// keyReason words sigstore-go's refusal of a key-signed entity.
func keyReason(e sgverify.SignedEntity, err error, ignoreTlog bool) string {
	msg := err.Error()
	switch {
	case !ignoreTlog && noTlogEntry(e):
		return "no transparency-log proof (the signature was not uploaded to Rekor); sign with tlog upload, or set ignoreTlog: true for this policy's keys"
	case strings.Contains(msg, "log inclusion") || strings.Contains(msg, "tlog") || strings.Contains(msg, "threshold not met"):
		return "its transparency-log proof does not verify against the trusted root: " + msg
	case strings.Contains(msg, "artifact digest") || strings.Contains(msg, "does not match"):
		return "a signature over other content (" + msg + ")"
	case strings.Contains(msg, "failed to verify signature"):
		return "not signed by any of the policy's keys (a signature by another key, or a changed payload)"
	}
	return msg
}

// certReason words sigstore-go's refusal of a certificate-signed entity.
func (p *Policy) certReason(e sgverify.SignedEntity, err error) string {
	msg := err.Error()
	switch {
	case noTlogEntry(e):
		return "no transparency-log proof (a keyless signature needs its Rekor entry)"
	case strings.Contains(msg, "outside certificate validity"):
		return "its certificate was not valid when the log saw the signature (" + msg + ")"
	case strings.Contains(msg, "failed to verify log inclusion") || strings.Contains(msg, "integrated timestamps"):
		return "its transparency-log proof does not verify against the trusted root: " + msg
	case strings.Contains(msg, "failed to verify leaf certificate"):
		return "its certificate was not issued by a Fulcio CA of the trusted root, or was not valid when the log saw the signature (" + msg + ")"
	case strings.Contains(msg, "certificate identity"):
		return "a certificate of another identity (" + certIdentity(e) + "); the policy trusts " + p.identityList()
	case strings.Contains(msg, "signed certificate timestamp"):
		return "its certificate has no valid SCT from a CT log of the trusted root"
	case strings.Contains(msg, "failed to verify signature"):
		return "the signature does not verify with its certificate (a changed payload?)"
	}
	return msg
}

func noTlogEntry(e sgverify.SignedEntity) bool {
	entries, err := e.TlogEntries()
	return err == nil && len(entries) == 0
}

func certIdentity(e sgverify.SignedEntity) string {
	vc, err := e.VerificationContent()
	if err != nil || vc.Certificate() == nil {
		return "unknown"
	}
	s, err := certificate.SummarizeCertificate(vc.Certificate())
	if err != nil {
		return "unknown"
	}
	return fmt.Sprintf("subject %s, issuer %s", s.SubjectAlternativeName, s.Issuer)
}

func (p *Policy) identityList() string {
	var out []string
	for _, id := range p.identities {
		s := id.Subject
		if s == "" {
			s = "~" + id.SubjectRegExp
		}
		out = append(out, fmt.Sprintf("subject %s, issuer %s", s, id.Issuer))
	}
	return strings.Join(out, " or ")
}

// rekorBundle is cosign's `dev.sigstore.cosign/bundle` annotation.
type rekorBundle struct {
	SignedEntryTimestamp []byte `json:"SignedEntryTimestamp"`
	Payload              struct {
		Body           string `json:"body"`
		IntegratedTime int64  `json:"integratedTime"`
		LogIndex       int64  `json:"logIndex"`
		LogID          string `json:"logID"`
	} `json:"Payload"`
}

// rekorBundleEntry turns cosign's annotation into the transparency-log
// entry of a Sigstore bundle (what sigstore-go verifies).
func rekorBundleEntry(s string) (*protorekor.TransparencyLogEntry, error) {
	var rb rekorBundle
	if err := json.Unmarshal([]byte(s), &rb); err != nil {
		return nil, err
	}
	body, err := base64.StdEncoding.DecodeString(rb.Payload.Body)
	if err != nil {
		return nil, errors.New("body is not base64")
	}
	logID, err := hex.DecodeString(rb.Payload.LogID)
	if err != nil {
		return nil, errors.New("logID is not hex")
	}
	var kv struct {
		Kind       string `json:"kind"`
		APIVersion string `json:"apiVersion"`
	}
	if err := json.Unmarshal(body, &kv); err != nil {
		return nil, errors.New("body is not a Rekor entry")
	}
	return &protorekor.TransparencyLogEntry{
		LogIndex:          rb.Payload.LogIndex,
		LogId:             &protocommon.LogId{KeyId: logID},
		KindVersion:       &protorekor.KindVersion{Kind: kv.Kind, Version: kv.APIVersion},
		IntegratedTime:    rb.Payload.IntegratedTime,
		InclusionPromise:  &protorekor.InclusionPromise{SignedEntryTimestamp: rb.SignedEntryTimestamp},
		CanonicalizedBody: body,
	}, nil
}
