package node

import (
	"runtime"
	"runtime/debug"
	"time"
)

// memoryReleaseDelay is how long the pull slots stay idle after a burst
// before its memory goes back to the system.
const memoryReleaseDelay = 5 * time.Second

// releaseMemory gives a burst's memory back once no download runs or
// waits: the pooled buffers are dropped, the registry connections kept for
// reuse are closed, and the Go runtime collects and
// returns free memory at once. Left to itself the runtime keeps the heap of
// a burst mapped until a later collection and its background scavenger
// (minutes on an idle daemon); a node that took a burst would carry it.
func (s *Service) releaseMemory() {
	s.cfg.Puller.Buffers.Trim()
	s.cur.Load().puller.CloseIdleConnections()
	// Two collections: the first moves what sync.Pools hold (gRPC's and
	// HTTP/2's buffers among them) to their victim caches, the second
	// frees those, so the memory goes back now rather than at a later
	// collection.
	runtime.GC()
	debug.FreeOSMemory()
	s.log.Debug("pulls done: memory given back to the system")
}
