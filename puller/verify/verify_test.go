package verify_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/verify"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/signtest"
)

// prefixMatcher stands in for the images matcher of the config (its
// grammar is tested where it lives): a pattern matches the repository
// equal to it or under it.
func prefixMatcher(patterns []string) (func(string, string) bool, error) {
	return func(registry, repository string) bool {
		image := registry + "/" + repository
		for _, p := range patterns {
			if image == p || strings.HasPrefix(image, p+"/") {
				return true
			}
		}
		return false
	}, nil
}

type fixture struct {
	t    *testing.T
	reg  *registrytest.Registry
	repo string // host/name
}

func newFixture(t *testing.T, opts registrytest.Options) *fixture {
	reg := registrytest.StartT(t, opts)
	return &fixture{t: t, reg: reg, repo: reg.Host() + "/filters/header"}
}

// push pushes a module under tag and returns its manifest descriptor.
func (f *fixture) push(tag string, size int) ocispec.Descriptor {
	f.t.Helper()
	d, err := registrytest.PushWasm(context.Background(), f.repo+":"+tag, registrytest.Module(tag, size), registrytest.LayoutCNCF)
	if err != nil {
		f.t.Fatal(err)
	}
	return d
}

// collect reads the signatures of subjects through the counting proxy,
// with the puller's own repository (its address guard, timeouts and
// retries).
func (f *fixture) collect(lim verify.Limits, subjects ...ocispec.Descriptor) (*verify.Evidence, error) {
	f.t.Helper()
	p := puller.New(puller.Config{InsecureRegistries: []string{f.reg.ProxyHost()}, RetryBudget: 2 * time.Second})
	ref, err := puller.ParseReference(f.reg.ProxyHost() + "/filters/header:any")
	if err != nil {
		f.t.Fatal(err)
	}
	repo, err := p.SignatureRepository(ref, puller.Credential{})
	if err != nil {
		f.t.Fatal(err)
	}
	return verify.Collect(context.Background(), repo, subjects, lim)
}

func compile(t *testing.T, spec verify.PolicySpec) *verify.Policy {
	t.Helper()
	spec.Images = []string{"reg/filters"}
	if spec.Name == "" {
		spec.Name = "acme"
	}
	ps, err := verify.Compile(verify.Spec{Policies: []verify.PolicySpec{spec}}, verify.Options{NewMatcher: prefixMatcher})
	if err != nil {
		t.Fatal(err)
	}
	return ps.Match("reg", "filters/header")
}

func keyPolicy(t *testing.T, kps ...signtest.KeyPair) *verify.Policy {
	var keys []verify.PEMSource
	for _, kp := range kps {
		keys = append(keys, verify.PEMSource{PEM: kp.PublicPEM})
	}
	return compile(t, verify.PolicySpec{Cosign: &verify.CosignSpec{Keys: keys, IgnoreTlog: true}})
}

// check collects and checks, and returns the result or the refusal.
func (f *fixture) check(p *verify.Policy, subjects ...ocispec.Descriptor) (verify.Result, error) {
	f.t.Helper()
	ev, err := f.collect(verify.Limits{}, subjects...)
	if err != nil {
		f.t.Fatalf("collect: %v", err)
	}
	return p.Check(context.Background(), f.repo, ev)
}

func wantVerified(t *testing.T, res verify.Result, err error, form string) {
	t.Helper()
	if err != nil {
		t.Fatalf("not verified: %v", err)
	}
	if res.Form != form || res.Policy != "acme" || res.Signer == "" {
		t.Fatalf("verified as %+v, want form %s by policy acme", res, form)
	}
}

func wantRefused(t *testing.T, err error, words ...string) {
	t.Helper()
	if err == nil {
		t.Fatal("verified; want a refusal")
	}
	var f *verify.Failure
	if !errors.Is(err, errdefs.ErrNotVerified) || !errors.As(err, &f) {
		t.Fatalf("error %v is not a verification failure", err)
	}
	for _, w := range words {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("refusal %q does not say %q", err, w)
		}
	}
	if !strings.Contains(err.Error(), "policy acme") || !strings.Contains(err.Error(), "sha256:") {
		t.Fatalf("refusal %q does not name the policy and digest", err)
	}
}

func TestCosignKey(t *testing.T) {
	f := newFixture(t, registrytest.Options{})
	kp := signtest.GenerateKeyPair(t)
	other := signtest.GenerateKeyPair(t)
	signed := f.push("signed", 512)
	signtest.SignKey(t, kp, f.repo+"@"+signed.Digest.String(), false)

	t.Run("good .sig signature", func(t *testing.T) {
		res, err := f.check(keyPolicy(t, kp), signed)
		wantVerified(t, res, err, "cosign")
		if res.Subject != signed.Digest {
			t.Fatalf("covers %s, want %s", res.Subject, signed.Digest)
		}
	})
	t.Run("any one of the keys", func(t *testing.T) {
		res, err := f.check(keyPolicy(t, other, kp), signed)
		wantVerified(t, res, err, "cosign")
	})
	t.Run("signature by another key", func(t *testing.T) {
		_, err := f.check(keyPolicy(t, other), signed)
		wantRefused(t, err, "not signed by any of the policy's keys")
	})
	t.Run("no signature", func(t *testing.T) {
		unsigned := f.push("unsigned", 600)
		_, err := f.check(keyPolicy(t, kp), unsigned)
		wantRefused(t, err, "no signature")
	})
	t.Run("signature copied from another image", func(t *testing.T) {
		victim := f.push("copied", 700)
		signtest.CopyCosignSignature(t, f.repo, signed.Digest, victim.Digest)
		_, err := f.check(keyPolicy(t, kp), victim)
		wantRefused(t, err, "a payload for another digest", signed.Digest.String())
	})
	t.Run("tampered payload", func(t *testing.T) {
		img := f.push("tampered", 800)
		signtest.SignKey(t, kp, f.repo+"@"+img.Digest.String(), false)
		layers := signtest.ReadCosignSignature(t, f.repo, img.Digest)
		layers[0].Payload = []byte(strings.Replace(string(layers[0].Payload), `"optional":null`, `"optional":{"x":"y"}`, 1))
		signtest.PushCosignSignature(t, f.repo, img.Digest, layers)
		_, err := f.check(keyPolicy(t, kp), img)
		wantRefused(t, err, "not signed by any of the policy's keys")
	})
	t.Run("no transparency-log proof when one is required", func(t *testing.T) {
		vs := signtest.NewSigstore(t)
		rootPath := filepath.Join(t.TempDir(), "root.json")
		if err := os.WriteFile(rootPath, vs.TrustedRootJSON(t), 0o600); err != nil {
			t.Fatal(err)
		}
		p := compile(t, verify.PolicySpec{Cosign: &verify.CosignSpec{Keys: []verify.PEMSource{{PEM: kp.PublicPEM}}, TrustedRoot: rootPath}})
		_, err := f.check(p, signed)
		wantRefused(t, err, "no transparency-log proof")
	})
}

func TestCosignBundle(t *testing.T) {
	f := newFixture(t, registrytest.Options{})
	kp := signtest.GenerateKeyPair(t)
	signed := f.push("bundled", 512)
	signtest.SignKey(t, kp, f.repo+"@"+signed.Digest.String(), true)

	t.Run("good bundle through the referrers tag", func(t *testing.T) {
		f.reg.ResetCounts()
		res, err := f.check(keyPolicy(t, kp), signed)
		wantVerified(t, res, err, "sigstore-bundle")
		// The test registry has no referrers API: the bundle came by the
		// sha256-<hex> referrers tag.
		if f.reg.Counts().ManifestGets["filters/header:sha256-"+signed.Digest.Encoded()] == 0 {
			t.Fatalf("the referrers tag was not read: %+v", f.reg.Counts().ManifestGets)
		}
	})
	t.Run("signature by another key", func(t *testing.T) {
		_, err := f.check(keyPolicy(t, signtest.GenerateKeyPair(t)), signed)
		wantRefused(t, err, "Sigstore bundle")
	})
	t.Run("bundle for another digest", func(t *testing.T) {
		victim := f.push("victim", 900)
		refs := signtest.Referrers(t, f.repo, signed.Digest)
		if len(refs) != 1 {
			t.Fatalf("%d referrers, want the one bundle", len(refs))
		}
		signtest.AttachCopy(t, f.repo, refs[0], victim.Digest)
		_, err := f.check(keyPolicy(t, kp), victim)
		wantRefused(t, err, "a bundle for another digest", signed.Digest.Encoded())
	})
}

func TestIndexSignatureCoversEntry(t *testing.T) {
	f := newFixture(t, registrytest.Options{})
	kp := signtest.GenerateKeyPair(t)
	entry := f.push("entry", 512)
	idx, err := registrytest.PushIndex(context.Background(), f.repo+":multi", []registrytest.IndexEntry{{Descriptor: entry,
		Platform: &ocispec.Platform{OS: "wasip1", Architecture: "wasm"}}})
	if err != nil {
		t.Fatal(err)
	}
	signtest.SignKey(t, kp, f.repo+"@"+idx.Digest.String(), false)
	res, err := f.check(keyPolicy(t, kp), entry, idx)
	wantVerified(t, res, err, "cosign")
	if res.Subject != idx.Digest {
		t.Fatalf("covers %s, want the index %s", res.Subject, idx.Digest)
	}
	// The entry alone, without the index it was chosen from, is not signed.
	_, err = f.check(keyPolicy(t, kp), entry)
	wantRefused(t, err, "no signature")
}

func TestKeyless(t *testing.T) {
	f := newFixture(t, registrytest.Options{})
	vs := signtest.NewSigstore(t)
	rootPath := filepath.Join(t.TempDir(), "trusted_root.json")
	if err := os.WriteFile(rootPath, vs.TrustedRootJSON(t), 0o600); err != nil {
		t.Fatal(err)
	}
	const issuer = "https://token.actions.githubusercontent.com"
	const subject = "https://github.com/acme/filters/.github/workflows/release.yml@refs/heads/main"
	policy := func(ids ...verify.IdentitySpec) *verify.Policy {
		return compile(t, verify.PolicySpec{Cosign: &verify.CosignSpec{Keyless: ids, TrustedRoot: rootPath}})
	}
	exact := policy(verify.IdentitySpec{Issuer: issuer, Subject: subject})

	t.Run("good", func(t *testing.T) {
		d := f.push("keyless-good", 512)
		vs.SignKeyless(t, f.repo, d.Digest, subject, issuer, signtest.KeylessOptions{})
		res, err := f.check(exact, d)
		wantVerified(t, res, err, "cosign")
		if !strings.Contains(res.Signer, subject) {
			t.Fatalf("signer %q does not name the identity", res.Signer)
		}
		res, err = f.check(policy(verify.IdentitySpec{Issuer: issuer, SubjectRegExp: `^https://github\.com/acme/`}), d)
		wantVerified(t, res, err, "cosign")
	})
	t.Run("wrong identity", func(t *testing.T) {
		d := f.push("keyless-other", 513)
		vs.SignKeyless(t, f.repo, d.Digest, "https://github.com/mallory/filters/.github/workflows/release.yml@refs/heads/main", issuer, signtest.KeylessOptions{})
		_, err := f.check(exact, d)
		wantRefused(t, err, "a certificate of another identity", "mallory")
	})
	t.Run("no tlog proof", func(t *testing.T) {
		d := f.push("keyless-notlog", 514)
		vs.SignKeyless(t, f.repo, d.Digest, subject, issuer, signtest.KeylessOptions{NoTlog: true})
		_, err := f.check(exact, d)
		wantRefused(t, err, "no transparency-log proof")
	})
	t.Run("expired certificate outside its tlog time", func(t *testing.T) {
		d := f.push("keyless-expired", 515)
		// The certificate is valid for ten minutes from now; the log saw
		// the signature fifty minutes later.
		vs.SignKeyless(t, f.repo, d.Digest, subject, issuer, signtest.KeylessOptions{At: time.Now().Add(50 * time.Minute)})
		_, err := f.check(exact, d)
		wantRefused(t, err, "not valid when the log saw the signature")
	})
	t.Run("certificate from another CA", func(t *testing.T) {
		d := f.push("keyless-otherca", 516)
		signtest.NewSigstore(t).SignKeyless(t, f.repo, d.Digest, subject, issuer, signtest.KeylessOptions{})
		_, err := f.check(exact, d)
		wantRefused(t, err)
	})
	t.Run("bundle", func(t *testing.T) {
		d := f.push("keyless-bundle", 517)
		vs.KeylessBundle(t, f.repo, d.Digest, d.Digest, subject, issuer)
		res, err := f.check(exact, d)
		wantVerified(t, res, err, "sigstore-bundle")
	})
	t.Run("bundle whose statement names another digest", func(t *testing.T) {
		d := f.push("keyless-bundle-other", 518)
		vs.KeylessBundle(t, f.repo, d.Digest, digest.FromString("another image"), subject, issuer)
		_, err := f.check(exact, d)
		wantRefused(t, err, "a bundle for another digest")
	})
}

func TestNotation(t *testing.T) {
	f := newFixture(t, registrytest.Options{})
	ca := signtest.NewNotaryCA(t, "release")
	d := f.push("notary", 512)
	ca.Sign(t, f.repo, d.Digest)
	policy := func(ca *signtest.NotaryCA, ids ...string) *verify.Policy {
		return compile(t, verify.PolicySpec{Notation: &verify.NotationSpec{
			TrustedCertificates: []verify.PEMSource{{PEM: ca.CAPEM}}, TrustedIdentities: ids}})
	}
	t.Run("good", func(t *testing.T) {
		res, err := f.check(policy(ca, "x509.subject: CN=release,O=Acme,ST=WA,C=US"), d)
		wantVerified(t, res, err, "notation")
		res, err = f.check(policy(ca, "*"), d)
		wantVerified(t, res, err, "notation")
	})
	t.Run("another identity", func(t *testing.T) {
		_, err := f.check(policy(ca, "x509.subject: CN=ci,O=Acme,ST=WA,C=US"), d)
		wantRefused(t, err, "Notary Project signature")
	})
	t.Run("another CA", func(t *testing.T) {
		_, err := f.check(policy(signtest.NewNotaryCA(t, "release"), "*"), d)
		wantRefused(t, err, "Notary Project signature")
	})
	t.Run("cosign policy does not take a notation signature", func(t *testing.T) {
		_, err := f.check(keyPolicy(t, signtest.GenerateKeyPair(t)), d)
		wantRefused(t, err, "no signature", "1 Notary Project signatures found")
	})
}

func TestJunkReferrers(t *testing.T) {
	f := newFixture(t, registrytest.Options{AllowIncompleteIndexes: true})
	kp := signtest.GenerateKeyPair(t)

	t.Run("10000 junk of other types before a good bundle", func(t *testing.T) {
		d := f.push("junk-other", 512)
		signtest.SignKey(t, kp, f.repo+"@"+d.Digest.String(), true)
		signtest.JunkReferrers(t, f.repo, d.Digest, 10000, "application/vnd.example.junk", false)
		f.reg.ResetCounts()
		res, err := f.check(keyPolicy(t, kp), d)
		wantVerified(t, res, err, "sigstore-bundle")
		// Junk of another type is listed, never fetched.
		if n := f.reg.Counts().ManifestGets; len(n) > 4 {
			t.Fatalf("%d manifests fetched: %v", len(n), n)
		}
	})
	t.Run("10000 junk signatures: a bounded number tried", func(t *testing.T) {
		d := f.push("junk-same", 513)
		signtest.SignKey(t, kp, f.repo+"@"+d.Digest.String(), true)
		signtest.JunkReferrers(t, f.repo, d.Digest, 10000, "application/vnd.dev.sigstore.bundle.v0.3+json", false)
		f.reg.ResetCounts()
		ev, err := f.collect(verify.Limits{}, d)
		if err != nil {
			t.Fatal(err)
		}
		if c := f.reg.Counts().Requests; c > verify.DefaultMaxSignatures+8 {
			t.Fatalf("%d requests for the signatures of one image", c)
		}
		if ev.Skipped < 10000-verify.DefaultMaxSignatures {
			t.Fatalf("skipped %d, want the junk past the limit counted", ev.Skipped)
		}
		_, err = keyPolicy(t, kp).Check(context.Background(), f.repo, ev)
		wantRefused(t, err, "not read")
	})
}

func TestRegistryUnavailable(t *testing.T) {
	f := newFixture(t, registrytest.Options{})
	d := f.push("flaky", 512)
	var hits atomic.Int32
	f.reg.SetFault(func(r *http.Request) (int, bool) {
		if strings.Contains(r.URL.Path, ".sig") {
			hits.Add(1)
			return http.StatusServiceUnavailable, true
		}
		return 0, false
	})
	ev, err := f.collect(verify.Limits{}, d)
	if !errors.Is(err, errdefs.ErrUnavailable) || ev != nil {
		t.Fatalf("got %v, %v; want ErrUnavailable", ev, err)
	}
	if hits.Load() < 2 {
		t.Fatalf("the signature tag was asked %d times; want retries", hits.Load())
	}
}

func TestSizeCaps(t *testing.T) {
	f := newFixture(t, registrytest.Options{})
	kp := signtest.GenerateKeyPair(t)
	d := f.push("capped", 512)
	signtest.SignKey(t, kp, f.repo+"@"+d.Digest.String(), false)
	ev, err := f.collect(verify.Limits{MaxBlobSize: 10}, d)
	if err != nil {
		t.Fatal(err)
	}
	if len(ev.Cosign) != 0 || ev.Skipped != 1 {
		t.Fatalf("payload over the cap was read: %+v", ev)
	}
	_, err = keyPolicy(t, kp).Check(context.Background(), f.repo, ev)
	wantRefused(t, err, "over the cap")
	ev, err = f.collect(verify.Limits{MaxManifestSize: 10}, d)
	if err != nil {
		t.Fatal(err)
	}
	if len(ev.Cosign) != 0 || ev.Skipped != 1 {
		t.Fatalf("signature manifest over the cap was read: %+v", ev)
	}
}
