//go:build pprof

package main

import (
	"net/http"
	"net/http/pprof"
)

// addDebugHandlers serves Go's profiles under /debug/pprof/ on the metrics
// address, in a binary built with -tags pprof (the burst benchmark's
// BURST_PROFILE): never in the shipped one, whose metrics port any pod on
// the node may reach.
func addDebugHandlers(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
}
