package puller

import "oras.land/oras-go/v2/registry/remote"

// SignatureRepository is ref's repository as the pull reached it (the same
// credentials, address guard, timeouts and retries), for reading the
// image's signatures. Its metadata reads (the referrers index) are capped
// at the manifest limit.
func (p *Puller) SignatureRepository(ref Reference, cred Credential) (*remote.Repository, error) {
	repo, err := p.repository(ref, cred)
	if err != nil {
		return nil, err
	}
	repo.MaxMetadataBytes = p.cfg.MaxManifestSize
	return repo, nil
}
