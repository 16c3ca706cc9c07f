package node

import (
	"context"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/verify"
)

// Signature verification on the node (the config's `verification`).
//
// A pulled module is checked before its blob is committed to the store, so
// nothing refused is ever at a path a pod can mount. What was collected
// (the signatures) and what passed (policy fingerprints) is recorded on
// disk per manifest, so a republish or a restart asks the registry
// nothing, and a changed policy re-checks stored modules offline before a
// new pod gets them. Running pods keep their mounts.

// verifyRecord is what the node knows of a manifest's signatures.
type verifyRecord struct {
	Manifest digest.Digest `json:"manifest"`
	// Subjects are the manifests signatures were looked for.
	Subjects []ocispec.Descriptor `json:"subjects"`
	// Evidence is every signature collected, nil if never collected.
	Evidence *verify.Evidence `json:"evidence,omitempty"`
	// Passed maps a policy fingerprint to the signer that satisfied it
	// (`inspect` shows them: store.Store.Verification reads this field).
	Passed map[string]store.PassedPolicy `json:"passed,omitempty"`
}

func (s *Service) readVerifyRecord(manifest digest.Digest) (verifyRecord, bool) {
	var r verifyRecord
	if !s.store.GetVerification(manifest, &r) || r.Manifest != manifest {
		return verifyRecord{}, false
	}
	return r, true
}

func (s *Service) writeVerifyRecord(r verifyRecord) error {
	return s.store.PutVerification(r.Manifest, r)
}

// verifyVerdict is the outcome of verifying one image for one publish.
type verifyVerdict struct {
	policy  *verify.Policy
	signer  string
	warning error // warn mode: what failed; the module is served
}

// verifyPulled checks a module just downloaded (its bytes still in a temp
// file) with the signatures of subjects read through repo. An enforced
// refusal is returned as an error: the caller drops the bytes.
func (s *Service) verifyPulled(ctx context.Context, st *settings, ref puller.Reference, manifest digest.Digest, subjects []ocispec.Descriptor, repo func() (verify.Repository, error)) error {
	p := st.verification.Match(ref.Registry, ref.Repository)
	if p == nil {
		if st.verification.DenyUnmatched {
			return s.refuseUnmatched(ref, manifest)
		}
		return nil
	}
	rec := verifyRecord{Manifest: manifest, Subjects: subjects}
	start := time.Now()
	r, err := repo()
	if err != nil {
		return err
	}
	ev, err := verify.Collect(ctx, r, subjects, st.verifyLimits)
	if err != nil {
		s.cfg.Metrics.Verification("unavailable")
		return &errdefs.Error{Kind: errdefs.ErrUnavailable, Image: ref.Original, Cause: err, Msg: "reading the image's signatures"}
	}
	rec.Evidence = ev
	_, err = s.checkRecord(ctx, ref, p, &rec)
	switch {
	case err == nil:
		s.cfg.Metrics.Verification("verified")
	case p.Mode == verify.Enforce:
		s.cfg.Metrics.Verification("refused")
	}
	s.log.Info("module signatures checked", "image", ref.Original, "manifest", manifest, "policy", p.Name,
		"signatures", ev.Count(), "skipped", ev.Skipped, "verified", err == nil, "duration", time.Since(start))
	if werr := s.writeVerifyRecord(rec); werr != nil {
		return withImage(werr, ref.Original)
	}
	if err != nil && p.Mode == verify.Enforce {
		return err
	}
	return nil
}

// checkRecord checks rec's evidence against p and records a pass.
func (s *Service) checkRecord(ctx context.Context, ref puller.Reference, p *verify.Policy, rec *verifyRecord) (verify.Result, error) {
	res, err := p.Check(ctx, ref.Name(), rec.Evidence)
	if err != nil {
		return res, err
	}
	if rec.Passed == nil {
		rec.Passed = map[string]store.PassedPolicy{}
	}
	rec.Passed[p.Fingerprint] = store.PassedPolicy{Policy: p.Name, Signer: res.Signer, At: time.Now().UTC()}
	return res, nil
}

func (s *Service) refuseUnmatched(ref puller.Reference, manifest digest.Digest) error {
	s.cfg.Metrics.Verification("refused")
	return &verify.Failure{Image: ref.Original, Digest: manifest}
}

// verification decides whether a module on the node may be given to this
// publish's pod: no registry request when the manifest passed this policy
// before; an offline check of the kept signatures after a policy change;
// the registry only for a module stored before any policy covered it.
func (s *Service) verification(ctx context.Context, req PublishRequest, rec store.RefRecord, accessOf func() access) (verifyVerdict, error) {
	st := s.cur.Load()
	ref := req.Image
	p := st.verification.Match(ref.Registry, ref.Repository)
	if p == nil {
		if st.verification.DenyUnmatched {
			return verifyVerdict{}, s.refuseUnmatched(ref, rec.Manifest)
		}
		return verifyVerdict{}, nil
	}
	vr, ok := s.readVerifyRecord(rec.Manifest)
	if ok {
		if ps, ok := vr.Passed[p.Fingerprint]; ok {
			s.cfg.Metrics.Verification("cached")
			return verifyVerdict{policy: p, signer: ps.Signer}, nil
		}
	} else {
		vr = verifyRecord{Manifest: rec.Manifest}
	}
	if vr.Evidence == nil {
		// Stored before a policy covered it: ask the registry once.
		ev, err := s.collectStored(ctx, st, ref, rec, &vr, accessOf)
		if err != nil {
			s.cfg.Metrics.Verification("unavailable")
			return verifyVerdict{}, err
		}
		vr.Evidence = ev
	}
	res, err := s.checkRecord(ctx, ref, p, &vr)
	if werr := s.writeVerifyRecord(vr); werr != nil {
		return verifyVerdict{}, withImage(werr, ref.Original)
	}
	if err != nil {
		if p.Mode == verify.Warn {
			s.cfg.Metrics.Verification("warned")
			return verifyVerdict{policy: p, warning: err}, nil
		}
		s.cfg.Metrics.Verification("refused")
		return verifyVerdict{}, err
	}
	s.cfg.Metrics.Verification("verified")
	return verifyVerdict{policy: p, signer: res.Signer}, nil
}

// collectStored reads from the registry the signatures of a stored
// manifest, with this pod's credentials.
func (s *Service) collectStored(ctx context.Context, st *settings, ref puller.Reference, rec store.RefRecord, vr *verifyRecord, accessOf func() access) (*verify.Evidence, error) {
	pinned := ref.ByDigest(rec.Manifest)
	attempts, err := st.puller.Attempts(ctx, pinned, accessOf().keyrings...)
	if err != nil {
		return nil, err
	}
	desc, cred, err := st.puller.ResolveWith(ctx, pinned, attempts)
	if err != nil {
		return nil, err
	}
	if len(vr.Subjects) == 0 {
		vr.Subjects = []ocispec.Descriptor{desc}
	}
	repo, err := st.puller.SignatureRepository(pinned, cred)
	if err != nil {
		return nil, err
	}
	ev, err := verify.Collect(ctx, repo, vr.Subjects, st.verifyLimits)
	if err != nil {
		return nil, &errdefs.Error{Kind: errdefs.ErrUnavailable, Image: ref.Original, Cause: err, Msg: "reading the image's signatures"}
	}
	return ev, nil
}

// report records a verifyVerdict on the pod.
func (s *Service) report(req PublishRequest, v verifyVerdict) {
	ev := s.cfg.Events
	if ev == nil || v.policy == nil {
		return
	}
	if v.warning != nil {
		ev.VerificationFailed(req.Pod, req.Image.Original, v.policy.Name, v.warning)
		s.log.Warn("serving a module that failed verification (warn mode)", "image", req.Image.Original, "policy", v.policy.Name, "err", v.warning)
		return
	}
	ev.Verified(req.Pod, req.Image.Original, v.policy.Name, v.signer)
}
