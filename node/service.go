package node

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/singleflight"

	"github.com/wasm-csi/wasm-csi/puller"
)

// PullPolicy says when a publish asks the registry.
type PullPolicy string

const (
	PullIfNotPresent PullPolicy = "IfNotPresent"
	PullAlways       PullPolicy = "Always"
	PullNever        PullPolicy = "Never"
)

// DefaultPullTimeout bounds one pull. It outlives kubelet's 2-minute call
// deadline on purpose: kubelet's retry joins the pull still in flight.
const DefaultPullTimeout = 10 * time.Minute

// DefaultFileName is the module's file name in the volume.
const DefaultFileName = "plugin.wasm"

// PodInfo identifies the pod a volume is for.
type PodInfo struct {
	Name, Namespace, UID, ServiceAccount string
}

// PublishRequest is a validated NodePublishVolume.
type PublishRequest struct {
	VolumeID   string
	TargetPath string
	Image      puller.Reference
	PullPolicy PullPolicy
	// SHA256 is the pinned sha256 of the module's bytes, or empty.
	SHA256   digest.Digest
	FileName string
	Pod      PodInfo
}

// Puller is what the service needs of a registry client.
type Puller interface {
	Resolve(ctx context.Context, ref puller.Reference) (ocispec.Descriptor, error)
	Pull(ctx context.Context, ref puller.Reference, desc ocispec.Descriptor, sink puller.Sink) (puller.Module, error)
}

// Config configures a Service.
type Config struct {
	// PullTimeout bounds one pull (default DefaultPullTimeout).
	PullTimeout time.Duration
	// Validate, if set, checks a module file before it is stored.
	Validate func(path string) error
}

// Service publishes and unpublishes module volumes on this node.
type Service struct {
	cfg     Config
	store   *Store
	puller  Puller
	mounter *Mounter
	log     *slog.Logger
	flight  singleflight.Group
	locks   *keyedLock
}

// NewService returns a Service over an opened store.
func NewService(cfg Config, store *Store, p Puller, m *Mounter, log *slog.Logger) *Service {
	if cfg.PullTimeout <= 0 {
		cfg.PullTimeout = DefaultPullTimeout
	}
	return &Service{cfg: cfg, store: store, puller: p, mounter: m, log: log, locks: newKeyedLock()}
}

// Publish makes the module of req.Image visible at req.TargetPath as
// req.FileName, read-only. It is idempotent and undoes partial work on failure.
func (s *Service) Publish(ctx context.Context, req PublishRequest) error {
	start := time.Now()
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
			return newError(ErrVolumeConflict, image, nil,
				"volume %s is already published at %s with image %s; unpublish it first or use a new volume", req.VolumeID, req.TargetPath, rec.Image)
		}
		mounted, err := s.mounter.IsMountPoint(req.TargetPath)
		if err != nil {
			return newError(ErrInternal, image, err, "checking the target path %s", req.TargetPath)
		}
		if mounted {
			return nil
		}
		// A record without a mount: a publish that failed half-way or a
		// crash. Redo the mount with the digest already chosen for this
		// volume, so the pod's file never changes.
		module, manifest = rec.Module, rec.Manifest
	} else {
		ref, cached, err := s.resolve(ctx, req)
		if err != nil {
			return err
		}
		module, manifest = ref.Module, ref.Manifest
		s.log.Info("module resolved", "image", image, "digest", module, "manifest", manifest, "cached", cached, "policy", req.PullPolicy)
	}
	if req.SHA256 != "" && req.SHA256 != module {
		return newError(ErrDigestMismatch, image, nil,
			"the module's sha256 is %s but the volume pins %s; fix the sha256 attribute or the image", module.Encoded(), req.SHA256.Encoded())
	}
	if !s.store.HasBlob(module) {
		return newError(ErrNotPresent, image, nil, "module %s of this volume is no longer on the node; delete and recreate the pod", module)
	}
	view, err := s.store.ViewDir(module, req.FileName)
	if err != nil {
		return withImage(err, image)
	}
	rec = VolumeRecord{
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
		if derr := s.store.DeleteVolume(req.VolumeID, req.TargetPath); derr != nil {
			s.log.Error("undoing volume record", "volume", req.VolumeID, "err", derr)
		}
		return newError(ErrInternal, image, err, "mounting the module at %s", req.TargetPath)
	}
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
		return newError(ErrInternal, "", err, "unmounting volume %s at %s", volumeID, target)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return newError(ErrInternal, "", err, "removing target path %s of volume %s", target, volumeID)
	}
	if err := s.store.DeleteVolume(volumeID, target); err != nil {
		return err
	}
	s.log.Info("volume unpublished", "volume", volumeID, "target", target)
	return nil
}

// resolve finds the module for req under its pull policy, pulling if needed.
// cached is true when no download was made.
func (s *Service) resolve(ctx context.Context, req PublishRequest) (RefRecord, bool, error) {
	key := req.Image.String()
	switch req.PullPolicy {
	case PullNever:
		rec, ok := s.store.GetRef(key)
		if !ok {
			return RefRecord{}, false, newError(ErrNotPresent, req.Image.Original, nil,
				"pullPolicy is Never and the module is not on this node; pre-pull it or use IfNotPresent")
		}
		return rec, true, nil
	case PullIfNotPresent:
		if rec, ok := s.store.GetRef(key); ok {
			return rec, true, nil
		}
	}
	return s.pull(ctx, req.Image)
}

type pullResult struct {
	rec    RefRecord
	cached bool
}

// pull runs one pull per reference at a time. The pull runs on a context of
// its own, so it outlives a caller that gives up; the caller's retry joins it.
func (s *Service) pull(ctx context.Context, ref puller.Reference) (RefRecord, bool, error) {
	ch := s.flight.DoChan(ref.String(), func() (any, error) {
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.PullTimeout)
		defer cancel()
		rec, cached, err := s.doPull(pctx, ref)
		return pullResult{rec, cached}, err
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return RefRecord{}, false, r.Err
		}
		pr := r.Val.(pullResult)
		return pr.rec, pr.cached, nil
	case <-ctx.Done():
		return RefRecord{}, false, newError(ErrPullPending, ref.Original, ctx.Err(),
			"the pull is still in progress and goes on in the background; the retry will use it")
	}
}

func (s *Service) doPull(ctx context.Context, ref puller.Reference) (RefRecord, bool, error) {
	start := time.Now()
	desc, err := s.puller.Resolve(ctx, ref)
	if err != nil {
		return RefRecord{}, false, err
	}
	byDigest := ref.ByDigest(desc.Digest).String()
	if rec, ok := s.store.GetRef(byDigest); ok {
		// The manifest is known: the module is on the node already.
		rec.Ref = ref.String()
		if ref.Digest == "" {
			if err := s.store.PutRef(rec); err != nil {
				return RefRecord{}, false, withImage(err, ref.Original)
			}
		}
		return rec, true, nil
	}
	s.log.Info("pulling module", "image", ref.Original, "manifest", desc.Digest)
	w, err := s.store.NewBlobWriter()
	if err != nil {
		return RefRecord{}, false, withImage(err, ref.Original)
	}
	defer w.Abort()
	mod, err := s.puller.Pull(ctx, ref, desc, w)
	if err != nil {
		if ne, ok := err.(*Error); ok { // the store failed, e.g. a full disk
			return RefRecord{}, false, withImage(ne, ref.Original)
		}
		return RefRecord{}, false, err
	}
	d, err := w.Commit(s.cfg.Validate)
	if err != nil {
		return RefRecord{}, false, withImage(err, ref.Original)
	}
	rec := RefRecord{Ref: byDigest, Manifest: desc.Digest, Module: d, Size: mod.Size, Layout: string(mod.Layout), PulledAt: time.Now().UTC()}
	if err := s.store.PutRef(rec); err != nil {
		return RefRecord{}, false, withImage(err, ref.Original)
	}
	if ref.Digest == "" {
		rec.Ref = ref.String()
		if err := s.store.PutRef(rec); err != nil {
			return RefRecord{}, false, withImage(err, ref.Original)
		}
	}
	s.log.Info("module pulled", "image", ref.Original, "digest", d, "manifest", desc.Digest,
		"layout", mod.Layout, "bytes", mod.Size, "duration", time.Since(start))
	return rec, false, nil
}

// withImage names the image in a node error that has none.
func withImage(err error, image string) error {
	var ne *Error
	if errors.As(err, &ne) && ne.Image == "" {
		cp := *ne
		cp.Image = image
		return &cp
	}
	if ne == nil {
		return newError(ErrInternal, image, err, "%s", "internal error")
	}
	return err
}
