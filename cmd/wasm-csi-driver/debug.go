//go:build !pprof

package main

import "net/http"

// addDebugHandlers adds nothing: profiling endpoints exist only in a binary
// built with -tags pprof (pprof.go).
func addDebugHandlers(*http.ServeMux) {}
