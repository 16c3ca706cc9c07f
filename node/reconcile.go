package node

import (
	"errors"
	"os"
	"syscall"
)

// ReconcileResult says what reconcile found at start.
type ReconcileResult struct {
	// Volumes is the number of volume records read.
	Volumes int
	// Mounted counts records whose target is mounted: pods that kept
	// running while the daemon was down.
	Mounted int
	// Remounted counts mounted targets that were not read-only, nosuid and
	// nodev (a crash between the bind mount and its read-only remount) and
	// were remounted so.
	Remounted int
	// Removed counts records whose target path is gone (kubelet cleaned the
	// pod up while the daemon was down): they were removed and their module
	// use released.
	Removed int
	// Pending counts records whose target exists but is not mounted (a
	// crash during a publish or an unpublish): left for kubelet's retry of
	// the publish or its unpublish.
	Pending int
	// BadBlobs counts stored modules whose size cannot be right.
	BadBlobs int
	// RemovedBlobs counts bad modules no volume used, which were removed.
	RemovedBlobs int
}

// reconcile brings the driver's records in line with the host at start,
// before any CSI call is served. It acts only on its own volume records:
// a mount it has no record of is never touched, whoever made it.
//
//   - a record whose target path is gone is removed and its module use
//     released: kubelet unmounted and cleaned the pod while the daemon was
//     down, and will not call again;
//   - a record whose target exists but is not mounted is left alone and
//     logged: kubelet retries the publish (which mounts the module the
//     record names) or unpublishes (which forgets it);
//   - a record whose target is mounted but not read-only, nosuid and nodev
//     is remounted so: a publish's retry sees a mount point and returns.
//
// Stored modules are checked cheaply, without hashing them (that would
// make a start with a big store slow): each must be at least a Wasm header
// long and as long as every tag record that names it says. A bad module no
// volume uses is removed (the next publish pulls it again); one in use is
// logged and kept, since its pods already read it.
func (s *Service) reconcile() (ReconcileResult, error) {
	var res ReconcileResult
	recs, err := s.store.ListVolumes()
	if err != nil {
		return res, err
	}
	res.Volumes = len(recs)
	for _, rec := range recs {
		log := s.log.With("volume", rec.VolumeID, "target", rec.TargetPath, "image", rec.Image, "digest", rec.Module)
		if _, err := os.Lstat(rec.TargetPath); errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			if err := s.store.DeleteVolume(rec.VolumeID, rec.TargetPath); err != nil {
				log.Error("removing the record of a volume whose target is gone", "err", err)
				continue
			}
			s.uses.Release(rec.Module)
			s.store.Touch(rec.Module)
			res.Removed++
			log.Info("volume forgotten: its target path is gone (the pod was cleaned up while the driver was down)")
			continue
		} else if err != nil {
			log.Error("cannot check the target path of a volume; left as it is", "err", err)
			continue
		}
		mounted, err := s.mounter.IsMountPoint(rec.TargetPath)
		if err != nil {
			log.Error("cannot check whether the target path is mounted; left as it is", "err", err)
			continue
		}
		if !mounted {
			res.Pending++
			log.Warn("volume target exists but is not mounted (interrupted publish or unpublish); left for kubelet's retry or unpublish")
			continue
		}
		res.Mounted++
		fixed, err := s.mounter.EnsureReadOnly(rec.TargetPath)
		if err != nil {
			log.Error("volume target is mounted writable and could not be remounted read-only", "err", err)
			continue
		}
		if fixed {
			res.Remounted++
			log.Warn("volume target was mounted without ro,nosuid,nodev (interrupted publish); remounted")
		}
	}
	if res.BadBlobs, res.RemovedBlobs, err = s.store.CheckBlobs(s.uses, s.log); err != nil {
		return res, err
	}
	if res.Removed+res.Pending+res.Remounted+res.BadBlobs > 0 {
		s.log.Info("state reconciled at start", "volumes", res.Volumes, "mounted", res.Mounted, "removed", res.Removed,
			"pending", res.Pending, "remounted", res.Remounted, "badModules", res.BadBlobs, "removedModules", res.RemovedBlobs)
	}
	return res, nil
}
