package store

import (
	"os"
	"sort"
	"time"

	"github.com/opencontainers/go-digest"
)

// OpenReadOnly opens the store at root to read it (Inventory) without a
// running driver and without changing anything: the format version is
// checked (a newer store is refused as by Open), but nothing is created,
// cleaned up or migrated.
func OpenReadOnly(root string) (*Store, error) {
	s, err := openChecked(root)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(s.blobDir()); err != nil {
		return nil, storageError(err, "reading the store at "+root)
	}
	return s, nil
}

// openChecked is what Open and OpenReadOnly share: a Store at root whose
// format version was read and accepted (a newer store is refused) and
// recorded as found, before either changes or reads anything else.
func openChecked(root string) (*Store, error) {
	s := &Store{root: root}
	v, err := s.readFormat()
	if err != nil {
		return nil, err
	}
	if err := s.checkFormat(v); err != nil {
		return nil, err
	}
	s.foundAt = v
	return s, nil
}

// ModuleInfo is one stored module as Inventory lists it.
type ModuleInfo struct {
	Digest   digest.Digest `json:"digest"`
	Size     int64         `json:"size"`
	LastUsed time.Time     `json:"lastUsed"`
	// Refs are the tag records that resolve to it (image, manifest, layout).
	Refs []RefRecord `json:"refs"`
	// Volumes are the IDs of the published volumes that use it.
	Volumes []string `json:"volumes"`
	// Verification is what is recorded of the signatures of each manifest
	// its refs name (none: no policy covered it when pulled or used).
	Verification []VerificationState `json:"verification"`
}

// Inventory is what the store holds, read from disk.
type Inventory struct {
	Root       string         `json:"root"`
	Format     int            `json:"format"`
	StoreBytes int64          `json:"storeBytes"`
	Modules    []ModuleInfo   `json:"modules"`
	Volumes    []VolumeRecord `json:"volumes"`
	// GCNext are the modules a collection under the policy given would
	// remove now, in the order it would.
	GCNext []digest.Digest `json:"gcNext"`
	// Pulls are the downloads in flight.
	Pulls []PullInFlight `json:"pulls"`
}

// Inventory lists the store's modules (least recently used first), its
// volume records, and what a collection under policy would remove now. It
// only reads: a module counts as in use when a volume record names it.
func (s *Store) Inventory(policy GCPolicy, now time.Time) (Inventory, error) {
	inv := Inventory{Root: s.root, Format: s.foundAt}
	vols, err := s.ListVolumes()
	if err != nil {
		return inv, err
	}
	sort.Slice(vols, func(i, j int) bool { return vols[i].PublishedAt.Before(vols[j].PublishedAt) })
	inv.Volumes = vols
	if inv.Pulls, err = s.Pulls(); err != nil {
		return inv, err
	}
	byModule := map[digest.Digest][]string{}
	for _, v := range vols {
		byModule[v.Module] = append(byModule[v.Module], v.VolumeID)
	}
	refs, err := s.listRefs()
	if err != nil {
		return inv, err
	}
	mods, err := s.modules()
	if err != nil {
		return inv, err
	}
	sort.Slice(mods, func(i, j int) bool { return mods[i].lastUsed.Before(mods[j].lastUsed) })
	for _, m := range mods {
		inv.StoreBytes += m.size
		mi := ModuleInfo{Digest: m.digest, Size: m.size, LastUsed: m.lastUsed, Refs: refs[m.digest], Volumes: byModule[m.digest]}
		seen := map[digest.Digest]bool{}
		for _, r := range mi.Refs {
			if seen[r.Manifest] {
				continue
			}
			seen[r.Manifest] = true
			if v, ok := s.Verification(r.Manifest); ok {
				mi.Verification = append(mi.Verification, v)
			}
		}
		inv.Modules = append(inv.Modules, mi)
	}
	if _, err := s.sweep(policy, now, func(m storedModule, _ time.Duration, _ string) (bool, error) {
		if len(byModule[m.digest]) > 0 {
			return true, nil
		}
		inv.GCNext = append(inv.GCNext, m.digest)
		return false, nil
	}); err != nil {
		return inv, err
	}
	return inv, nil
}

// listRefs reads every tag record, by the module it resolves to.
func (s *Store) listRefs() (map[digest.Digest][]RefRecord, error) {
	out := map[digest.Digest][]RefRecord{}
	if err := readRecords(s.refDir(), func(rec RefRecord) { out[rec.Module] = append(out[rec.Module], rec) }); err != nil {
		return nil, storageError(err, "listing tag records")
	}
	for _, rs := range out {
		sort.Slice(rs, func(i, j int) bool { return rs[i].Ref < rs[j].Ref })
	}
	return out, nil
}
