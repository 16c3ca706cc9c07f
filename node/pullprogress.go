package node

import (
	"sync"
	"sync/atomic"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/wasm-csi/wasm-csi/node/progress"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
)

// Progress of long downloads. A pull is shared by every publish of the same
// reference (Service.pull), so its progress goes to every pod waiting on
// it: each publish registers its pod for as long as it waits. The download
// itself is announced in the store (store.BlobWriter.Announce), where
// `inspect` finds it without the daemon.

// pullWaiters are the pods waiting on each pull, by reference.
type pullWaiters struct {
	mu   sync.Mutex
	next uint64
	m    map[string]map[uint64]waiter
}

// waiter is a pod waiting on a pull, with the key of the credentials its
// publish pulls with (access.key).
type waiter struct {
	pod    PodInfo
	access string
}

// add registers pod (pulling with credentials access) as waiting on the
// pull of key until remove is called.
func (w *pullWaiters) add(key string, pod PodInfo, access string) (remove func()) {
	if pod.Name == "" {
		return func() {}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = map[string]map[uint64]waiter{}
	}
	if w.m[key] == nil {
		w.m[key] = map[uint64]waiter{}
	}
	w.next++
	id := w.next
	w.m[key][id] = waiter{pod, access}
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		delete(w.m[key], id)
		if len(w.m[key]) == 0 {
			delete(w.m, key)
		}
		if len(w.m) == 0 {
			w.m = nil // maps do not shrink: drop a burst's table
		}
	}
}

// pods lists the pods waiting on the pull of key, each once. When the
// pull runs with a pod's pull secret (private), only the pods pulling with
// the same credentials (access) are listed: the others have not shown the
// registry they may see the module (checkAccess runs after the pull), and
// its size is not theirs to learn.
func (w *pullWaiters) pods(key string, private bool, access string) []PodInfo {
	w.mu.Lock()
	defer w.mu.Unlock()
	seen := map[PodInfo]bool{}
	var out []PodInfo
	for _, wt := range w.m[key] {
		if private && wt.access != access {
			continue
		}
		if !seen[wt.pod] {
			seen[wt.pod] = true
			out = append(out, wt.pod)
		}
	}
	return out
}

// progressSink is the blob writer a download streams into, told by the
// puller which layer it reads and how many of its bytes arrived.
type progressSink struct {
	*store.BlobWriter
	started func(layer ocispec.Descriptor) *progress.Download
	dl      atomic.Pointer[progress.Download]
}

var _ puller.ProgressSink = (*progressSink)(nil)
var _ puller.DigestSink = (*progressSink)(nil)

func (p *progressSink) Started(layer ocispec.Descriptor) {
	if old := p.dl.Swap(p.started(layer)); old != nil {
		old.Stop()
	}
}

func (p *progressSink) Received(n int64) {
	if d := p.dl.Load(); d != nil {
		d.Add(n)
	}
}

// stop ends the reports.
func (p *progressSink) stop() {
	if d := p.dl.Load(); d != nil {
		d.Stop()
	}
}

// newProgressSink wraps w for the download of ref (manifest desc): the
// download is announced in the store when its layer is known, and one
// reporting Config.Progress's threshold or more is reported on schedule to
// the log and to the pods waiting on it (with a pod's pull secret,
// private, only those pulling with the leader's credentials).
func (s *Service) newProgressSink(w *store.BlobWriter, ref puller.Reference, desc ocispec.Descriptor, private bool, leader string) *progressSink {
	return &progressSink{BlobWriter: w, started: func(layer ocispec.Descriptor) *progress.Download {
		start := time.Now()
		if err := w.Announce(store.PullRecord{Image: ref.Original, Manifest: desc.Digest, Layer: layer.Digest,
			Total: layer.Size, Started: start.UTC()}); err != nil {
			// Only inspect misses it: the download goes on.
			s.log.Warn("pull in flight not recorded in the store", "image", ref.Original, "err", err)
		}
		return progress.Start(s.cfg.Clock, layer.Size, s.cfg.Progress, func(done, total int64) {
			s.log.Info("pull progress", "image", ref.Original, "layer", layer.Digest, "bytes", done, "total", total,
				"duration", time.Since(start).Round(time.Millisecond))
			if ev := s.cfg.Events; ev != nil {
				for _, pod := range s.waiting.pods(ref.String(), private, leader) {
					ev.PullProgress(pod, ref.Original, done, total)
				}
			}
		})
	}}
}
