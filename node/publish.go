package node

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Publish makes the module of req.Image visible at req.TargetPath as
// req.FileName, read-only. It is idempotent and undoes partial work on failure.
func (s *Service) Publish(ctx context.Context, req PublishRequest) (err error) {
	start := time.Now()
	defer func() {
		s.cfg.Metrics.Published(err, time.Since(start))
		// The memory a burst of publishes leaves goes back a few seconds
		// after the last one, not only after the last download.
		s.slots.Poke()
	}()
	unlock := s.locks.Lock(req.VolumeID)
	defer unlock()
	image := req.Image.Original

	rec, exists, err := s.store.GetVolume(req.VolumeID, req.TargetPath)
	if err != nil {
		return withImage(err, image)
	}
	var module, manifest digest.Digest
	if exists {
		if rec.Image != image || rec.FileName != req.FileName || rec.SHA256 != string(req.SHA256) || rec.PullPolicy != string(req.PullPolicy) {
			return errdefs.New(errdefs.ErrVolumeConflict, image, nil,
				"volume %s is already published at %s with image %s; unpublish it first or use a new volume", req.VolumeID, req.TargetPath, rec.Image)
		}
		mounted, err := s.mounter.IsMountPoint(req.TargetPath)
		if err != nil {
			return errdefs.New(errdefs.ErrInternal, image, err, "checking the target path %s", req.TargetPath)
		}
		if mounted {
			return nil
		}
		// A record without a mount: a publish that failed half-way or a
		// crash. Redo the mount with the digest already chosen for this
		// volume, so the pod's file never changes.
		module, manifest = rec.Module, rec.Manifest
	} else {
		// err is the named result, not a new variable: the deferred
		// Release below must see the error this publish returns.
		var ref store.RefRecord
		var cached bool
		ref, cached, err = s.resolve(ctx, req)
		if err != nil {
			return err
		}
		module, manifest = ref.Module, ref.Manifest
		s.cfg.Metrics.CacheLookup(cached)
		s.log.Info("module resolved", "image", image, "digest", module, "manifest", manifest, "cached", cached, "policy", req.PullPolicy)
		// Count this volume's use before anything else, under the lock the
		// collector takes: from here on the module cannot be removed.
		if !s.uses.Acquire(s.store, module) {
			return errdefs.New(errdefs.ErrNotPresent, image, nil, "module %s was removed from the node while this volume was being published; the retry pulls it again", module)
		}
		defer func() {
			if err != nil {
				s.uses.Release(module)
			}
		}()
	}
	if req.SHA256 != "" && req.SHA256 != module {
		return errdefs.New(errdefs.ErrDigestMismatch, image, nil,
			"the module's sha256 is %s but the volume pins %s; fix the sha256 attribute or the image", module.Encoded(), req.SHA256.Encoded())
	}
	if !s.store.HasBlob(module) {
		return errdefs.New(errdefs.ErrNotPresent, image, nil, "module %s of this volume is no longer on the node; delete and recreate the pod", module)
	}
	dir, err := s.store.ViewDir(module, req.FileName)
	if err != nil {
		return withImage(err, image)
	}
	view := s.store.ReadOnlyViewPath(module, req.FileName)
	if err := s.mounter.MountReadOnlyView(dir, s.store.EmptyDir(), view); err != nil {
		return errdefs.New(errdefs.ErrInternal, image, err, "mounting the module's read-only view")
	}
	rec = store.VolumeRecord{
		VolumeID: req.VolumeID, TargetPath: req.TargetPath, Image: image,
		PullPolicy: string(req.PullPolicy), SHA256: string(req.SHA256), FileName: req.FileName,
		Module: module, Manifest: manifest,
		PodName: req.Pod.Name, PodNS: req.Pod.Namespace, PodUID: req.Pod.UID,
		PublishedAt: time.Now().UTC(),
	}
	if !exists {
		if err := s.store.PutVolume(rec); err != nil {
			return withImage(err, image)
		}
	}
	if err := s.mountTarget(view, req.TargetPath); err != nil {
		// A new volume is forgotten again; an existing record (a crash
		// before its mount) stays, for kubelet's retry or unpublish.
		if !exists {
			if derr := s.store.DeleteVolume(req.VolumeID, req.TargetPath); derr != nil {
				s.log.Error("undoing volume record", "volume", req.VolumeID, "err", derr)
			}
		}
		return errdefs.New(errdefs.ErrInternal, image, err, "mounting the module at %s", req.TargetPath)
	}
	s.store.Touch(module)
	s.log.Info("volume published", "volume", req.VolumeID, "target", req.TargetPath, "image", image,
		"digest", module, "file", req.FileName, "pod", req.Pod.Namespace+"/"+req.Pod.Name, "duration", time.Since(start))
	return nil
}

// mountTarget creates target and bind-mounts view on it read-only. On
// failure it removes what it created.
func (s *Service) mountTarget(view, target string) error {
	created := false
	if _, err := os.Stat(target); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(target, 0o750); err != nil {
			return err
		}
		created = true
	} else if err != nil {
		return err
	}
	if err := s.mounter.BindReadOnly(view, target); err != nil {
		if created {
			os.Remove(target)
		}
		return err
	}
	return nil
}

// Unpublish unmounts target and forgets the volume. It is idempotent: a
// target that is not there, or not mounted, is success.
func (s *Service) Unpublish(ctx context.Context, volumeID, target string) error {
	unlock := s.locks.Lock(volumeID)
	defer unlock()
	if err := s.mounter.Unmount(target); err != nil {
		return errdefs.New(errdefs.ErrInternal, "", err, "unmounting volume %s at %s", volumeID, target)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return errdefs.New(errdefs.ErrInternal, "", err, "removing target path %s of volume %s", target, volumeID)
	}
	rec, known, err := s.store.GetVolume(volumeID, target)
	if err != nil {
		return err
	}
	if err := s.store.DeleteVolume(volumeID, target); err != nil {
		return err
	}
	if known {
		s.uses.Release(rec.Module)
		s.store.Touch(rec.Module)
	}
	s.log.Info("volume unpublished", "volume", volumeID, "target", target, "known", known)
	return nil
}
