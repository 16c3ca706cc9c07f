//go:build pprof

package main

import (
	"net/http"
	"net/http/pprof"
	"os"
	"runtime"
	"strconv"
)

// addDebugHandlers serves Go's profiles under /debug/pprof/ on the metrics
// address, in a binary built with -tags pprof (the burst benchmark's
// BURST_PROFILE): never in the shipped one, whose metrics port any pod on
// the node may reach.
func addDebugHandlers(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
}

// init sets the heap profile's sampling rate from WASM_CSI_MEMPROFILERATE
// (bytes; 1 records every allocation) before anything is allocated, to see
// the small objects a burst leaves behind, which the default 512 KiB rate
// misses.
func init() {
	if n, err := strconv.Atoi(os.Getenv("WASM_CSI_MEMPROFILERATE")); err == nil && n > 0 {
		runtime.MemProfileRate = n
	}
}
