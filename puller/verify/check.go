package verify

import (
	"context"
	"fmt"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Result says what verified an image.
type Result struct {
	Policy string
	// Signer names the key, certificate identity or Notary Project
	// certificate subject whose signature verified.
	Signer string
	// Form is "cosign", "sigstore-bundle" or "notation".
	Form string
	// Subject is the digest the signature covers (the manifest, or the
	// index it was chosen from).
	Subject digest.Digest
}

// Check decides, offline, whether ev holds a signature p trusts over one of
// ev's subjects. image names the image in messages and is what Notary
// Project signatures are checked as. The error is a *Failure (ErrNotVerified)
// naming what was found.
func (p *Policy) Check(ctx context.Context, image string, ev *Evidence) (Result, error) {
	var reasons reasonSet
	subjects := map[digest.Digest]ocispec.Descriptor{}
	for _, s := range ev.Subjects {
		subjects[s.Digest] = s
	}
	if p.usesCosign() {
		for _, s := range ev.Cosign {
			if _, ok := subjects[s.Subject]; !ok {
				continue
			}
			signer, reason := p.checkCosignSignature(s)
			if reason == "" {
				return Result{Policy: p.Name, Signer: signer, Form: "cosign", Subject: s.Subject}, nil
			}
			reasons.add("cosign signature: " + reason)
		}
		for _, b := range ev.Bundles {
			if _, ok := subjects[b.Subject]; !ok {
				continue
			}
			signer, reason := p.checkBundle(b)
			if reason == "" {
				return Result{Policy: p.Name, Signer: signer, Form: "sigstore-bundle", Subject: b.Subject}, nil
			}
			reasons.add("Sigstore bundle: " + reason)
		}
	}
	if p.notation != nil {
		for _, n := range ev.Notation {
			s, ok := subjects[n.Subject]
			if !ok {
				continue
			}
			signer, reason := p.notation.check(ctx, image, s, n)
			if reason == "" {
				return Result{Policy: p.Name, Signer: signer, Form: "notation", Subject: n.Subject}, nil
			}
			reasons.add("Notary Project signature: " + reason)
		}
	}
	if len(reasons.list) == 0 {
		reasons.add(p.noSignature(ev))
	}
	if ev.Skipped > 0 {
		reasons.add(fmt.Sprintf("%d more signatures not read (%v)", ev.Skipped, ev.Notes))
	}
	var d digest.Digest
	if len(ev.Subjects) > 0 {
		d = ev.Subjects[0].Digest
	}
	return Result{}, &Failure{Image: image, Digest: d, Policy: p.Name, Reasons: reasons.list}
}

func (p *Policy) usesCosign() bool {
	return len(p.keys) > 0 || len(p.keyless) > 0
}

func (p *Policy) noSignature(ev *Evidence) string {
	var forms []string
	if p.usesCosign() {
		forms = append(forms, "cosign signature (.sig tag or Sigstore bundle referrer)")
	}
	if p.notation != nil {
		forms = append(forms, "Notary Project signature")
	}
	found := ""
	if n := len(ev.Cosign) + len(ev.Bundles); n > 0 && !p.usesCosign() {
		found = fmt.Sprintf(" (%d cosign signatures found, which this policy does not accept)", n)
	}
	if n := len(ev.Notation); n > 0 && p.notation == nil {
		found += fmt.Sprintf(" (%d Notary Project signatures found, which this policy does not accept)", n)
	}
	return fmt.Sprintf("no signature: no %v found%s; sign the image and push the signature to its repository", forms, found)
}

// reasonSet keeps distinct reasons, in order, at most a few.
type reasonSet struct{ list []string }

func (r *reasonSet) add(s string) {
	for _, x := range r.list {
		if x == s {
			return
		}
	}
	if len(r.list) < 6 {
		r.list = append(r.list, s)
	}
}
