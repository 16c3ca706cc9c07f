package store

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
)

// VolumeRecord is what the driver knows of one published volume. It is
// written before the mount is made and removed after it is undone, so the
// records on disk always cover every mount the driver made.
type VolumeRecord struct {
	VolumeID    string        `json:"volumeID"`
	TargetPath  string        `json:"targetPath"`
	Image       string        `json:"image"`
	PullPolicy  string        `json:"pullPolicy"`
	SHA256      string        `json:"sha256,omitempty"`
	FileName    string        `json:"fileName"`
	Module      digest.Digest `json:"module"`
	Manifest    digest.Digest `json:"manifest"`
	PodName     string        `json:"podName,omitempty"`
	PodNS       string        `json:"podNamespace,omitempty"`
	PodUID      string        `json:"podUID,omitempty"`
	PublishedAt time.Time     `json:"publishedAt"`
}

func (s *Store) volumePath(volumeID, target string) string {
	sum := sha256.Sum256([]byte(volumeID + "\x00" + target))
	return filepath.Join(s.volumeDir(), hex.EncodeToString(sum[:])+".json")
}

// GetVolume returns the record of volumeID at target, if any.
func (s *Store) GetVolume(volumeID, target string) (VolumeRecord, bool, error) {
	var rec VolumeRecord
	err := readJSON(s.volumePath(volumeID, target), &rec)
	if errors.Is(err, os.ErrNotExist) {
		return VolumeRecord{}, false, nil
	}
	if err != nil {
		return VolumeRecord{}, false, storageError(err, "reading the volume record")
	}
	return rec, true, nil
}

// PutVolume writes a volume record.
func (s *Store) PutVolume(rec VolumeRecord) error {
	return writeJSON(s.volumePath(rec.VolumeID, rec.TargetPath), rec)
}

// DeleteVolume removes a volume record. A missing record is success.
func (s *Store) DeleteVolume(volumeID, target string) error {
	err := os.Remove(s.volumePath(volumeID, target))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return storageError(err, "removing the volume record")
	}
	return syncDir(s.volumeDir())
}

// ListVolumes returns every volume record on disk.
func (s *Store) ListVolumes() ([]VolumeRecord, error) {
	var out []VolumeRecord
	if err := readRecords(s.volumeDir(), func(rec VolumeRecord) { out = append(out, rec) }); err != nil {
		return nil, storageError(err, "listing volume records")
	}
	return out, nil
}
