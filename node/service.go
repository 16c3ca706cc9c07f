// Package node is the driver's work on this node: the Service that
// publishes and unpublishes module volumes, pulls (one per reference at a
// time, outliving a caller that gives up), checks a pod's access to a
// module another pod's secret pulled, damps images that keep failing, and
// reconciles its records with the host at start.
//
// It owns: the order of a publish (resolve, count the use, view, overlay,
// record, bind mount) and undoing it on failure, and the settings the
// config file changes at run time.
//
// It must not: read or write under the store's root except through
// node/store, make mounts except through its Mounter, talk to the
// Kubernetes API except through its Credentials and Events, or pick gRPC
// codes (it returns errdefs sentinels; csi maps them).
//
// Its parts live in subpackages: store (on-disk state), wasmcheck (module
// validation), mount (mounts), config (the config file), kube (pull secrets
// and events), metrics.
package node

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/semaphore"
	"k8s.io/utils/clock"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/metrics"
	"github.com/wasm-csi/wasm-csi/node/progress"
	"github.com/wasm-csi/wasm-csi/node/pullslots"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/node/wasmcheck"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/hostsconf"
	"github.com/wasm-csi/wasm-csi/puller/imagematch"
	"github.com/wasm-csi/wasm-csi/puller/verify"
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
	Attempts(ctx context.Context, ref puller.Reference, keyrings ...*puller.Keyring) ([]puller.Credential, error)
	ResolveWith(ctx context.Context, ref puller.Reference, attempts []puller.Credential) (ocispec.Descriptor, puller.Credential, error)
	Pull(ctx context.Context, ref puller.Reference, desc ocispec.Descriptor, sink puller.Sink, cred puller.Credential) (puller.Module, error)
	Sources(ref puller.Reference) ([]puller.Reference, error)
	// SignatureRepository is ref's repository, reached as the pull reached
	// it, for reading the image's signatures.
	SignatureRepository(ref puller.Reference, cred puller.Credential) (*remote.Repository, error)
	// CloseIdleConnections closes the registry connections kept for
	// reuse, once a burst of pulls is over.
	CloseIdleConnections()
}

// Credentials finds the registry credentials a pod may use: its
// imagePullSecrets, then its service account's.
type Credentials interface {
	Keyrings(ctx context.Context, pod PodInfo) ([]*puller.Keyring, error)
}

// Events tells a pod's owner what happened to its image, as kubelet's
// image events do. Implementations must never block a publish.
type Events interface {
	Pulling(pod PodInfo, image string)
	WaitingForPullSlot(pod PodInfo, image string, inFlight, slots int)
	// PullProgress: a long download's bytes so far, of its total
	// (Config.Progress paces them).
	PullProgress(pod PodInfo, image string, done, total int64)
	Pulled(pod PodInfo, image string, rec store.RefRecord, took time.Duration)
	AlreadyPresent(pod PodInfo, image string, rec store.RefRecord)
	Failed(pod PodInfo, image string, err error)
	// Verified: a signature the image's policy trusts covers the module.
	Verified(pod PodInfo, image, policy, signer string)
	// VerificationFailed: warn mode served a module its policy does not verify.
	VerificationFailed(pod PodInfo, image, policy string, err error)
}

// Mounter makes and removes the mounts pods see (package mount's Mounter
// on a node; a fake in unit tests).
type Mounter interface {
	// MountReadOnlyView mounts dir over empty at at as a read-only
	// overlay; an existing mount at at is kept.
	MountReadOnlyView(dir, empty, at string) error
	// BindReadOnly bind-mounts src at target read-only, nosuid, nodev.
	BindReadOnly(src, target string) error
	// IsMountPoint reports whether p is a mount point; a missing p is not.
	IsMountPoint(p string) (bool, error)
	// Unmount removes every mount on target; not mounted is success.
	Unmount(target string) error
	// EnsureReadOnly remounts target ro, nosuid, nodev if it is not all
	// three, and reports whether it did.
	EnsureReadOnly(target string) (bool, error)
}

// Config configures a Service.
type Config struct {
	// PullTimeout bounds one pull (default DefaultPullTimeout).
	PullTimeout time.Duration
	// Puller holds the registry settings the flags fix; the config file
	// adds insecure registries, mirrors and limits to them.
	Puller puller.Config
	// NewPuller makes a registry client for settings (default puller.New).
	NewPuller func(puller.Config) Puller
	// Metrics records what the service does (nil: nothing).
	Metrics *metrics.Metrics
	// GCInterval is how often unused modules are collected (default 1m).
	GCInterval time.Duration
	// MaxConcurrentValidations bounds the memory validation takes (default 2).
	MaxConcurrentValidations int
	// Credentials gives pods' pull secrets (nil: node credentials only).
	Credentials Credentials
	// Events records image events on pods (nil: none).
	Events Events
	// PullSlots bound the downloads in flight (default: slots of its own);
	// limits.maxConcurrentPulls sets their number.
	PullSlots *pullslots.Slots
	// RuntimeConfigMetrics counts runtime registry files that did not
	// parse (nil: not counted).
	RuntimeConfigMetrics *hostsconf.Metrics
	// Progress says which downloads send PullProgress events and how
	// often (zero: none).
	Progress progress.Policy
	// Clock paces the progress reports (default: the real clock).
	Clock clock.Clock
}

// settings are what the config file can change while the daemon runs.
type settings struct {
	// allowed bounds the images pods may name when restricted
	// (registries.allowed is set).
	allowed    imagematch.List
	restricted bool
	puller     Puller
	validation wasmcheck.Mode
	gc         store.GCPolicy
	prePull    []string
	// verification is the config's signature policies (node/verify.go).
	verification *verify.Policies
	verifyLimits verify.Limits
}

// Service publishes and unpublishes module volumes on this node.
type Service struct {
	cfg      Config
	store    *store.Store
	mounter  Mounter
	log      *slog.Logger
	flights  inflight // pulls in flight, one per reference (inflight.go)
	locks    *keyedLock
	uses     *store.Uses
	cur      atomic.Pointer[settings]
	validate *semaphore.Weighted // validation slots: each validation holds memory
	damp     *damper
	slots    *pullslots.Slots
	waiting  pullWaiters
	held     atomic.Int64 // publishes waiting in their call for a pull (pull.go holdCaller)
	// abandonAfter: a queued pull nobody asked for that long leaves the queue.
	abandonAfter time.Duration

	cfgStatus configStatus

	bgMu          sync.Mutex
	bg            context.Context
	prePullCancel context.CancelFunc
	runtime       *runtimeConf
}

// NewService returns a Service over an opened store, with default settings
// until Reconfigure. Module uses are counted from the volume records on disk.
func NewService(cfg Config, st *store.Store, m Mounter, log *slog.Logger) (*Service, error) {
	if cfg.PullTimeout <= 0 {
		cfg.PullTimeout = DefaultPullTimeout
	}
	if cfg.NewPuller == nil {
		cfg.NewPuller = func(c puller.Config) Puller { return puller.New(c) }
	}
	if cfg.GCInterval <= 0 {
		cfg.GCInterval = time.Minute
	}
	if cfg.MaxConcurrentValidations <= 0 {
		cfg.MaxConcurrentValidations = 2
	}
	if cfg.PullSlots == nil {
		cfg.PullSlots = pullslots.New(pullslots.DefaultLimit)
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Puller.Buffers == nil {
		cfg.Puller.Buffers = puller.NewBuffers(puller.BufferSize, puller.DefaultBufferBudget)
	}
	uses, err := store.NewUses(st)
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, store: st, mounter: m, log: log, locks: newKeyedLock(), uses: uses,
		validate: semaphore.NewWeighted(int64(cfg.MaxConcurrentValidations)), damp: newDamper(nil), slots: cfg.PullSlots,
		abandonAfter: DefaultAbandonAfter}
	s.slots.OnIdle(memoryReleaseDelay, s.releaseMemory)
	// Records of volumes kubelet cleaned up while the daemon was down.
	if _, err := s.reconcile(); err != nil {
		return nil, err
	}
	if err := s.Reconfigure(config.FileConfig{}); err != nil {
		return nil, err
	}
	return s, nil
}

// Reconfigure applies a config file: registries, limits, validation and
// the pre-pull list take effect for the next pull; pulls in flight finish
// with the settings they started with.
func (s *Service) Reconfigure(fc config.FileConfig) error {
	if err := fc.Validate(); err != nil {
		return err
	}
	pc := s.cfg.Puller
	pc.InsecureRegistries = append(append([]string(nil), s.cfg.Puller.InsecureRegistries...), fc.Registries.Insecure...)
	pc.Mirrors = fc.Registries.Mirrors
	pc.Runtime = s.runtimeResolver(fc)
	blocked, err := fc.Registries.BlockedNetworks()
	if err != nil {
		return err
	}
	pc.BlockedCIDRs = append(append([]netip.Prefix(nil), s.cfg.Puller.BlockedCIDRs...), blocked...)
	if q := fc.Limits.MaxModuleSize; q != nil {
		pc.MaxModuleSize = q.Value()
	}
	mode, err := wasmcheck.ParseMode(fc.Validation)
	if err != nil {
		return err
	}
	gc, err := fc.GCPolicy()
	if err != nil {
		return err
	}
	allowed, restricted, err := fc.Registries.AllowedImages()
	if err != nil {
		return err
	}
	slots := pullslots.DefaultLimit
	if n := fc.Limits.MaxConcurrentPulls; n != nil {
		slots = *n
	}
	s.slots.SetLimit(slots)
	var images []string
	for _, p := range fc.PrePull {
		images = append(images, p.Image)
	}
	policies, err := fc.VerificationPolicies()
	if err != nil {
		return err
	}
	s.cur.Store(&settings{allowed: allowed, restricted: restricted, puller: s.cfg.NewPuller(pc), validation: mode, gc: gc, prePull: images, verification: policies})
	s.cfg.Metrics.StoreCap(gc.MaxStoreBytes)
	s.damp.reset() // new registry settings may fix what failed
	s.startPrePull(images)
	return nil
}

// Start runs the background work (pre-pulls, garbage collection) until
// ctx ends.
func (s *Service) Start(ctx context.Context) {
	s.bgMu.Lock()
	s.bg = ctx
	s.watchRuntimeLocked()
	s.bgMu.Unlock()
	s.startPrePull(s.cur.Load().prePull)
	go s.gcLoop(ctx)
}

func (s *Service) gcLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.GCInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.collectGarbage()
		}
	}
}

// collectGarbage removes unused modules under the configured limits.
func (s *Service) collectGarbage() {
	policy := s.cur.Load().gc
	if policy.MaxAge == 0 && policy.MaxStoreBytes == 0 {
		return
	}
	res, err := s.store.Collect(s.uses, policy, time.Now(), s.log)
	if err != nil {
		s.log.Error("garbage collection failed", "err", err)
		return
	}
	if res.Removed > 0 {
		s.log.Info("garbage collected", "removed", res.Removed, "freedBytes", res.FreedBytes, "storeBytes", res.StoreBytes)
	}
	if policy.MaxStoreBytes > 0 && res.StoreBytes > policy.MaxStoreBytes {
		s.log.Info("store over limits.maxStoreSize: modules in use and modules used within limits.minimumModuleAge are kept",
			"storeBytes", res.StoreBytes, "maxStoreBytes", policy.MaxStoreBytes, "inUse", res.InUseModules, "usedRecently", res.TooYoung)
	}
}

// startPrePull pulls images in the background (IfNotPresent), replacing a
// pre-pull still running from an older config. Before Start it only records.
func (s *Service) startPrePull(images []string) {
	s.bgMu.Lock()
	defer s.bgMu.Unlock()
	if s.bg == nil {
		return
	}
	if s.prePullCancel != nil {
		s.prePullCancel()
	}
	ctx, cancel := context.WithCancel(s.bg)
	s.prePullCancel = cancel
	go func() {
		for _, img := range images {
			if ctx.Err() != nil {
				return
			}
			ref, err := puller.ParseReference(img)
			if err != nil {
				s.log.Error("pre-pull skipped", "image", img, "err", err)
				continue
			}
			if rec, ok := s.store.GetRef(ref.String()); ok {
				s.log.Debug("pre-pull: already present", "image", img, "digest", rec.Module)
				continue
			}
			rec, _, _, err := s.pull(ctx, ref, access{}, false)
			if err != nil {
				s.log.Error("pre-pull failed", "image", img, "err", err)
				continue
			}
			s.log.Info("pre-pulled", "image", img, "digest", rec.Module)
		}
	}()
}

// withImage names the image in a node error that has none.
func withImage(err error, image string) error {
	var ne *errdefs.Error
	if errors.As(err, &ne) && ne.Image == "" {
		cp := *ne
		cp.Image = image
		return &cp
	}
	if ne == nil {
		return errdefs.New(errdefs.ErrInternal, image, err, "%s", "internal error")
	}
	return err
}
