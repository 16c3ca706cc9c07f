// Package signtest signs images in a test registry the way publishers do:
// with the real cosign CLI (a key pair from `cosign generate-key-pair`, the
// default `.sig` tag or `--new-bundle-format` bundle referrers), with
// keyless material from sigstore-go's throwaway Sigstore (a Fulcio CA, a
// Rekor log and a TSA that live in the test, since no Fulcio is reachable),
// and with notation-go's signing API. It also forges what an attacker
// would push: copied signatures, junk referrers.
package signtest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/notaryproject/notation-go"
	nregistry "github.com/notaryproject/notation-go/registry"
	nsigner "github.com/notaryproject/notation-go/signer"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	protobundle "github.com/sigstore/protobuf-specs/gen/pb-go/bundle/v1"
	protocommon "github.com/sigstore/protobuf-specs/gen/pb-go/common/v1"
	protodsse "github.com/sigstore/protobuf-specs/gen/pb-go/dsse"
	protorekor "github.com/sigstore/protobuf-specs/gen/pb-go/rekor/v1"
	"github.com/sigstore/sigstore-go/pkg/root"
	"github.com/sigstore/sigstore-go/pkg/testing/ca"
	"github.com/sigstore/sigstore-go/pkg/tlog"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"google.golang.org/protobuf/encoding/protojson"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// EnvCosignBinary overrides the path of the cosign CLI.
const EnvCosignBinary = "WASM_CSI_COSIGN_BIN"

// CosignVersion is what `make tools` installs.
const CosignVersion = "v2.6.5"

// Cosign returns the path of the cosign CLI: $WASM_CSI_COSIGN_BIN, else
// <repo root>/bin/cosign. It fails t when there is none: `make tools`
// installs it.
func Cosign(t testing.TB) string {
	t.Helper()
	if p := os.Getenv(EnvCosignBinary); p != "" {
		return p
	}
	r, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(r, "bin", "cosign")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("signtest: no cosign CLI at %s; run `make tools` (go install github.com/sigstore/cosign/v2/cmd/cosign@%s)", p, CosignVersion)
	}
	return p
}

// KeyPair is a cosign key pair on disk.
type KeyPair struct {
	Dir       string
	Private   string
	PublicPEM string
}

// runCosign runs the cosign CLI with an empty key password and no network
// beyond the test registry.
func runCosign(t testing.TB, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command(Cosign(t), args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "COSIGN_PASSWORD=", "COSIGN_YES=true", "SIGSTORE_NO_CACHE=true", "HOME="+dir,
		"TUF_ROOT="+filepath.Join(dir, "tuf"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cosign %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// GenerateKeyPair runs `cosign generate-key-pair` in a new directory.
func GenerateKeyPair(t testing.TB) KeyPair {
	t.Helper()
	dir := t.TempDir()
	runCosign(t, dir, "generate-key-pair")
	pub, err := os.ReadFile(filepath.Join(dir, "cosign.pub"))
	if err != nil {
		t.Fatal(err)
	}
	return KeyPair{Dir: dir, Private: filepath.Join(dir, "cosign.key"), PublicPEM: string(pub)}
}

// SignKey signs image (host/repo@sha256:...) with `cosign sign --key`,
// without a transparency-log upload (no Rekor is reachable). bundle true
// adds --new-bundle-format: a Sigstore bundle referrer instead of the
// `.sig` tag.
func SignKey(t testing.TB, kp KeyPair, image string, bundle bool) {
	t.Helper()
	args := []string{"sign", "--yes", "--key", kp.Private, "--tlog-upload=false", "--allow-http-registry", "--allow-insecure-registry"}
	if bundle {
		args = append(args, "--new-bundle-format", "--use-signing-config=false")
	}
	runCosign(t, kp.Dir, append(args, image)...)
}

// Sigstore is a throwaway Fulcio CA, Rekor log and TSA.
type Sigstore struct {
	*ca.VirtualSigstore
}

// NewSigstore starts one.
func NewSigstore(t testing.TB) *Sigstore {
	t.Helper()
	vs, err := ca.NewVirtualSigstore()
	if err != nil {
		t.Fatal(err)
	}
	return &Sigstore{vs}
}

// TrustedRootJSON is the trusted root a policy names for this Sigstore
// (no CT logs: the throwaway CA embeds no SCTs).
func (s *Sigstore) TrustedRootJSON(t testing.TB) []byte {
	t.Helper()
	// The throwaway log's ID is its hex text; a trusted root holds the raw
	// key ID.
	logs := map[string]*root.TransparencyLog{}
	for id, l := range s.RekorLogs() {
		c := *l
		raw, err := hex.DecodeString(string(l.ID))
		if err != nil {
			t.Fatal(err)
		}
		c.ID = raw
		logs[id] = &c
	}
	tr, err := root.NewTrustedRoot(root.TrustedRootMediaType01, s.FulcioCertificateAuthorities(), nil, s.TimestampingAuthorities(), logs)
	if err != nil {
		t.Fatal(err)
	}
	b, err := tr.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// SimpleSigningPayload is cosign's payload for an image digest.
func SimpleSigningPayload(image string, d digest.Digest) []byte {
	repo := image
	if i := strings.IndexAny(repo, "@"); i >= 0 {
		repo = repo[:i]
	}
	return []byte(fmt.Sprintf(`{"critical":{"identity":{"docker-reference":%q},"image":{"docker-manifest-digest":%q},"type":"cosign container image signature"},"optional":null}`, repo, d))
}

// KeylessOptions changes what SignKeyless writes.
type KeylessOptions struct {
	// At is the time the log saw the signature (default: within the
	// certificate's ten minutes).
	At time.Time
	// NoTlog leaves out the transparency-log proof.
	NoTlog bool
}

// SignKeyless signs digest d of repo (host/name) as identity/issuer with
// a Fulcio certificate, and pushes it as cosign does: a layer of the
// `sha256-<hex>.sig` manifest with certificate, chain and Rekor bundle
// annotations.
func (s *Sigstore) SignKeyless(t testing.TB, repo string, d digest.Digest, identity, issuer string, o KeylessOptions) {
	t.Helper()
	payload := SimpleSigningPayload(repo, d)
	at := o.At
	if at.IsZero() {
		at = time.Now().Add(5 * time.Minute)
	}
	ent, err := s.SignAtTime(identity, issuer, payload, at)
	if err != nil {
		t.Fatal(err)
	}
	vc, _ := ent.VerificationContent()
	sc, _ := ent.SignatureContent()
	certPEM, _ := cryptoutils.MarshalCertificateToPEM(vc.Certificate())
	ann := map[string]string{
		"dev.cosignproject.cosign/signature": base64.StdEncoding.EncodeToString(sc.Signature()),
		"dev.sigstore.cosign/certificate":    string(certPEM),
	}
	fca := s.FulcioCertificateAuthorities()[0].(*root.FulcioCertificateAuthority)
	chainPEM, _ := cryptoutils.MarshalCertificatesToPEM(append(append([]*x509.Certificate{}, fca.Intermediates...), fca.Root))
	ann["dev.sigstore.cosign/chain"] = string(chainPEM)
	if !o.NoTlog {
		entries, _ := ent.TlogEntries()
		tle := entries[0].TransparencyLogEntry()
		// The log's signed entry timestamp over the entry, as Rekor
		// returns it and cosign stores it.
		pl := tlog.RekorPayload{
			Body:           base64.StdEncoding.EncodeToString(tle.GetCanonicalizedBody()),
			IntegratedTime: tle.GetIntegratedTime(),
			LogIndex:       tle.GetLogIndex(),
			LogID:          hex.EncodeToString(tle.GetLogId().GetKeyId()),
		}
		set, err := s.RekorSignPayload(pl)
		if err != nil {
			t.Fatal(err)
		}
		rb := map[string]any{"SignedEntryTimestamp": set, "Payload": pl}
		b, _ := json.Marshal(rb)
		ann["dev.sigstore.cosign/bundle"] = string(b)
	}
	PushCosignSignature(t, repo, d, []CosignLayer{{Payload: payload, Annotations: ann}})
}

// KeylessBundle pushes a Sigstore bundle (v0.3, DSSE of cosign's signature
// statement, with the log's inclusion proof) for digest d of repo as a
// referrer, as cosign --new-bundle-format does. subject is the digest the
// statement names (d, unless forging a bundle for another digest).
func (s *Sigstore) KeylessBundle(t testing.TB, repo string, d, subject digest.Digest, identity, issuer string) {
	t.Helper()
	stmt := fmt.Sprintf(`{"_type":"https://in-toto.io/Statement/v1","subject":[{"digest":{"sha256":%q}}],"predicateType":"https://sigstore.dev/cosign/sign/v1"}`, subject.Encoded())
	ent, err := s.AttestAtTime(identity, issuer, []byte(stmt), time.Now().Add(5*time.Minute), true)
	if err != nil {
		t.Fatal(err)
	}
	vc, _ := ent.VerificationContent()
	sc, _ := ent.SignatureContent()
	env := sc.EnvelopeContent().RawEnvelope()
	payload, _ := base64.StdEncoding.DecodeString(env.Payload)
	sig, _ := base64.StdEncoding.DecodeString(env.Signatures[0].Sig)
	entries, _ := ent.TlogEntries()
	tss, _ := ent.Timestamps()
	tle := entries[0].TransparencyLogEntry()
	var kv struct {
		Kind       string `json:"kind"`
		APIVersion string `json:"apiVersion"`
	}
	if err := json.Unmarshal(tle.GetCanonicalizedBody(), &kv); err != nil {
		t.Fatal(err)
	}
	tle.KindVersion = &protorekor.KindVersion{Kind: kv.Kind, Version: kv.APIVersion}
	set, err := s.RekorSignPayload(tlog.RekorPayload{Body: base64.StdEncoding.EncodeToString(tle.GetCanonicalizedBody()),
		IntegratedTime: tle.GetIntegratedTime(), LogIndex: tle.GetLogIndex(), LogID: hex.EncodeToString(tle.GetLogId().GetKeyId())})
	if err != nil {
		t.Fatal(err)
	}
	tle.InclusionPromise = &protorekor.InclusionPromise{SignedEntryTimestamp: set}
	pb := &protobundle.Bundle{
		MediaType: "application/vnd.dev.sigstore.bundle.v0.3+json",
		VerificationMaterial: &protobundle.VerificationMaterial{
			Content:     &protobundle.VerificationMaterial_Certificate{Certificate: &protocommon.X509Certificate{RawBytes: vc.Certificate().Raw}},
			TlogEntries: []*protorekor.TransparencyLogEntry{tle},
			TimestampVerificationData: &protobundle.TimestampVerificationData{
				Rfc3161Timestamps: []*protocommon.RFC3161SignedTimestamp{{SignedTimestamp: tss[0]}},
			},
		},
		Content: &protobundle.Bundle_DsseEnvelope{DsseEnvelope: &protodsse.Envelope{
			Payload: payload, PayloadType: env.PayloadType,
			Signatures: []*protodsse.Signature{{Sig: sig}},
		}},
	}
	b, err := protojson.Marshal(pb)
	if err != nil {
		t.Fatal(err)
	}
	PushBundleReferrer(t, repo, d, b)
}

// PushBundleReferrer attaches bundle JSON to digest d of repo as cosign
// does (through the referrers tag when the registry has no referrers API).
func PushBundleReferrer(t testing.TB, repo string, d digest.Digest, bundle []byte) ocispec.Descriptor {
	t.Helper()
	const bt = "application/vnd.dev.sigstore.bundle.v0.3+json"
	return pushReferrer(t, repo, d, bt, registrytest.Blob{MediaType: bt, Data: bundle})
}

func pushReferrer(t testing.TB, repo string, d digest.Digest, artifactType string, layer registrytest.Blob) ocispec.Descriptor {
	t.Helper()
	ctx := context.Background()
	r, subject := resolve(t, repo, d)
	cfg := []byte("{}")
	cfgDesc := ocispec.Descriptor{MediaType: "application/vnd.oci.empty.v1+json", Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
	lDesc := ocispec.Descriptor{MediaType: layer.MediaType, Digest: digest.FromBytes(layer.Data), Size: int64(len(layer.Data))}
	for _, b := range []struct {
		d ocispec.Descriptor
		b []byte
	}{{cfgDesc, cfg}, {lDesc, layer.Data}} {
		if err := r.Blobs().Push(ctx, b.d, bytes.NewReader(b.b)); err != nil && !strings.Contains(err.Error(), "exist") {
			t.Fatal(err)
		}
	}
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: artifactType, Config: cfgDesc,
		Layers: []ocispec.Descriptor{lDesc}, Subject: &subject}
	m.SchemaVersion = 2
	mb, _ := json.Marshal(m)
	md := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mb), Size: int64(len(mb)), ArtifactType: artifactType}
	// oras-go's Push of a manifest with a subject updates the referrers
	// tag itself when the registry has no referrers API.
	if err := r.Push(ctx, md, bytes.NewReader(mb)); err != nil {
		t.Fatal(err)
	}
	return md
}

// CosignLayer is one signature in a `.sig` manifest.
type CosignLayer struct {
	Payload     []byte
	Annotations map[string]string
}

// PushCosignSignature writes the `.sig` manifest of d in repo.
func PushCosignSignature(t testing.TB, repo string, d digest.Digest, layers []CosignLayer) {
	t.Helper()
	var blobs []registrytest.Blob
	for _, l := range layers {
		blobs = append(blobs, registrytest.Blob{MediaType: "application/vnd.dev.cosign.simplesigning.v1+json", Data: l.Payload, Annotations: l.Annotations})
	}
	if _, err := registrytest.PushArtifact(context.Background(), repo+":"+sigTag(d), registrytest.Artifact{Layers: blobs}); err != nil {
		t.Fatal(err)
	}
}

// CopyCosignSignature copies the `.sig` manifest of from to the `.sig` tag
// of to: a signature copied from another image.
func CopyCosignSignature(t testing.TB, repo string, from, to digest.Digest) {
	t.Helper()
	r := repository(t, repo)
	desc, b, _ := fetchManifest(t, r, sigTag(from))
	if err := r.Manifests().PushReference(context.Background(), desc, bytes.NewReader(b), sigTag(to)); err != nil {
		t.Fatal(err)
	}
}

// ReadCosignSignature returns the layers of d's `.sig` manifest, payloads
// included, to be changed and pushed again.
func ReadCosignSignature(t testing.TB, repo string, d digest.Digest) []CosignLayer {
	t.Helper()
	r := repository(t, repo)
	_, _, m := fetchManifest(t, r, sigTag(d))
	var out []CosignLayer
	for _, l := range m.Layers {
		out = append(out, CosignLayer{Payload: fetchBlob(t, r, l), Annotations: l.Annotations})
	}
	return out
}

// sigTag is the tag cosign keeps d's signatures under: "sha256-<hex>.sig".
func sigTag(d digest.Digest) string { return d.Algorithm().String() + "-" + d.Encoded() + ".sig" }

// repository is registrytest.Repository(repo), failing t on an error.
func repository(t testing.TB, repo string) *remote.Repository {
	t.Helper()
	r, err := registrytest.Repository(repo)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// resolve returns repo and the descriptor of d in it.
func resolve(t testing.TB, repo string, d digest.Digest) (*remote.Repository, ocispec.Descriptor) {
	t.Helper()
	r := repository(t, repo)
	desc, err := r.Resolve(context.Background(), d.String())
	if err != nil {
		t.Fatal(err)
	}
	return r, desc
}

// fetchManifest returns the image manifest at reference (a tag or a
// digest) in r: its descriptor, its bytes (checked against the
// descriptor) and what they say.
func fetchManifest(t testing.TB, r *remote.Repository, reference string) (ocispec.Descriptor, []byte, ocispec.Manifest) {
	t.Helper()
	desc, b, err := oras.FetchBytes(context.Background(), r.Manifests(), reference, oras.DefaultFetchBytesOptions)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("manifest %s: %v", reference, err)
	}
	return desc, b, m
}

// fetchBlob returns the blob desc of r, checked against desc.
func fetchBlob(t testing.TB, r *remote.Repository, desc ocispec.Descriptor) []byte {
	t.Helper()
	b, err := content.FetchAll(context.Background(), r.Blobs(), desc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Referrers returns the referrers of d (through the referrers tag on a
// registry without the API).
func Referrers(t testing.TB, repo string, d digest.Digest) []ocispec.Descriptor {
	t.Helper()
	ctx := context.Background()
	r, subject := resolve(t, repo, d)
	var out []ocispec.Descriptor
	if err := r.Referrers(ctx, subject, "", func(rs []ocispec.Descriptor) error { out = append(out, rs...); return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

// AttachCopy makes the manifest of an existing referrer (a signature of
// another image) a referrer of d too: same layer, subject d.
func AttachCopy(t testing.TB, repo string, ref ocispec.Descriptor, d digest.Digest) {
	t.Helper()
	r := repository(t, repo)
	_, _, m := fetchManifest(t, r, ref.Digest.String())
	pushReferrer(t, repo, d, m.ArtifactType, registrytest.Blob{MediaType: m.Layers[0].MediaType, Data: fetchBlob(t, r, m.Layers[0])})
}

// JunkReferrers writes the referrers tag of d as an index of n junk
// descriptors (of artifactType; manifests that do not exist), followed by
// the referrers d already had unless keep is false. The registry must
// accept incomplete indexes.
func JunkReferrers(t testing.TB, repo string, d digest.Digest, n int, artifactType string, keepFirst bool) {
	t.Helper()
	existing := Referrers(t, repo, d)
	var list []ocispec.Descriptor
	if keepFirst {
		list = append(list, existing...)
	}
	for i := 0; i < n; i++ {
		junk := fmt.Sprintf("junk %d", i)
		list = append(list, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: artifactType,
			Digest: digest.FromString(junk), Size: 600})
	}
	if !keepFirst {
		list = append(list, existing...)
	}
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: list}
	idx.SchemaVersion = 2
	b, _ := json.Marshal(idx)
	r := repository(t, repo)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := r.Manifests().PushReference(context.Background(), desc, bytes.NewReader(b), d.Algorithm().String()+"-"+d.Encoded()); err != nil {
		t.Fatal(err)
	}
}

// NotaryCA is a CA and a leaf certificate to sign with notation-go.
type NotaryCA struct {
	CAPEM   string
	caCert  *x509.Certificate
	caKey   *ecdsa.PrivateKey
	Subject string
	cn      string
}

// NewNotaryCA makes a CA whose leaf has subject "CN=<cn>,O=Acme,ST=WA,C=US"
// (notation's trusted identities need C, ST and O).
func NewNotaryCA(t testing.TB, cn string) *NotaryCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn + " CA", Organization: []string{"Acme"}, Province: []string{"WA"}, Country: []string{"US"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &NotaryCA{CAPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), caCert: cert, caKey: key,
		Subject: "CN=" + cn + ",O=Acme,ST=WA,C=US", cn: cn}
}

// Sign signs digest d of repo with notation-go (a leaf of this CA, JWS
// envelope) and pushes the signature as a referrer.
func (c *NotaryCA) Sign(t testing.TB, repo string, d digest.Digest) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: c.cn, Organization: []string{"Acme"}, Province: []string{"WA"}, Country: []string{"US"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.caCert, &key.PublicKey, c.caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	s, err := nsigner.NewGenericSigner(key, []*x509.Certificate{leaf, c.caCert})
	if err != nil {
		t.Fatal(err)
	}
	r := repository(t, repo+"@"+d.String())
	_, err = notation.Sign(context.Background(), s, nregistry.NewRepository(r), notation.SignOptions{
		ArtifactReference: repo + "@" + d.String(),
		SignerSignOptions: notation.SignerSignOptions{SignatureMediaType: "application/jose+json"},
	})
	if err != nil {
		t.Fatal(err)
	}
}
