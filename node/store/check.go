package store

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/opencontainers/go-digest"
)

// minModuleSize is the length of a Wasm header (magic and version): no
// module is shorter.
const minModuleSize = 8

// CheckBlobs checks the size of every stored module against the Wasm
// header's and its tag records', without hashing (that would make a start
// with a big store slow). A bad module no volume uses is removed (the next
// publish pulls it again); one in use is logged and kept, since its pods
// already read it. Foreign files are logged and left. It reports how many
// modules were bad and how many of them were removed.
func (s *Store) CheckBlobs(uses *Uses, log *slog.Logger) (bad, removed int, err error) {
	entries, err := os.ReadDir(s.blobDir())
	if err != nil {
		return 0, 0, storageError(err, "listing the store")
	}
	// What the tag records say of each module's size.
	sizes := map[digest.Digest][]int64{}
	refs, err := os.ReadDir(s.refDir())
	if err != nil {
		return 0, 0, storageError(err, "listing tag records")
	}
	for _, r := range refs {
		if strings.HasPrefix(r.Name(), tmpPrefix) {
			continue
		}
		var rec RefRecord
		// A size of 0 is unknown, not wrong: no module is empty.
		if readJSON(filepath.Join(s.refDir(), r.Name()), &rec) == nil && rec.Size > 0 {
			sizes[rec.Module] = append(sizes[rec.Module], rec.Size)
		}
	}
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, tmpPrefix) {
			continue
		}
		d := digest.NewDigestFromEncoded(digest.SHA256, name)
		fi, err := e.Info()
		if d.Validate() != nil || err != nil || !fi.Mode().IsRegular() {
			log.Warn("foreign file in the module store; left as it is", "path", filepath.Join(s.blobDir(), name))
			continue
		}
		problem := ""
		if fi.Size() < minModuleSize {
			problem = "shorter than a Wasm header"
		}
		for _, n := range sizes[d] {
			if n != fi.Size() {
				problem = "not the size its tag record says"
			}
		}
		if problem == "" {
			continue
		}
		bad++
		log := log.With("digest", d, "bytes", fi.Size(), "recorded", sizes[d], "problem", problem)
		var rerr error
		inUse, _ := uses.unlessUsed(d, func() error { rerr = s.removeModule(d); return rerr })
		if inUse {
			log.Error("stored module is damaged and in use; its pods keep their mount, delete them to pull it again")
			continue
		}
		if rerr != nil {
			log.Error("removing a damaged stored module", "err", rerr)
			continue
		}
		removed++
		log.Warn("damaged stored module removed; the next publish pulls it again")
	}
	return bad, removed, nil
}

// Usage counts the stored modules and their bytes.
func (s *Store) Usage() (modules int, bytes int64) {
	entries, err := os.ReadDir(s.blobDir())
	if err != nil {
		return 0, 0
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			continue
		}
		if fi, err := e.Info(); err == nil && fi.Mode().IsRegular() {
			modules++
			bytes += fi.Size()
		}
	}
	return modules, bytes
}

// CountVolumes counts the volume records on disk, without reading them.
func (s *Store) CountVolumes() (int, error) {
	vols, err := os.ReadDir(s.volumeDir())
	if err != nil {
		return 0, err
	}
	count := 0
	for _, v := range vols {
		if strings.HasSuffix(v.Name(), ".json") && !strings.HasPrefix(v.Name(), tmpPrefix) {
			count++
		}
	}
	return count, nil
}
