package puller_test

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// progressSink is a memSink that records what a ProgressSink is told.
type progressSink struct {
	memSink
	mu       sync.Mutex
	started  []ocispec.Descriptor
	received atomic.Int64
	// atStart is how many bytes were received when Started was called.
	atStart int64
}

func (s *progressSink) Started(layer ocispec.Descriptor) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.started = append(s.started, layer)
	s.atStart = s.received.Load()
}

func (s *progressSink) Received(n int64) { s.received.Add(n) }

// TestProgressSink: the puller tells a ProgressSink the layer before its
// bytes, then every byte of it read from the registry; for a raw layer
// (the sink's digest fast path) and for a compressed tar (the layer's
// bytes, not the module's, are what is counted).
func TestProgressSink(t *testing.T) {
	f := newFixture(t, registrytest.Options{}, 3<<20+17)
	p := puller.New(puller.Config{InsecureRegistries: []string{f.reg.ProxyHost()}})
	ctx := context.Background()
	for _, layout := range []registrytest.Layout{registrytest.LayoutCNCF, registrytest.LayoutOCIGzip} {
		t.Run(layout.String(), func(t *testing.T) {
			tag := f.reg.Host() + "/net/progress-" + layout.String() + ":1.0"
			if _, err := registrytest.PushWasm(ctx, tag, f.mod, layout); err != nil {
				t.Fatal(err)
			}
			ref, err := puller.ParseReference(f.reg.ProxyHost() + "/net/progress-" + layout.String() + ":1.0")
			if err != nil {
				t.Fatal(err)
			}
			attempts, err := p.Attempts(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			desc, cred, err := p.ResolveWith(ctx, ref, attempts)
			if err != nil {
				t.Fatal(err)
			}
			var sink progressSink
			mod, err := p.Pull(ctx, ref, desc, &sink, cred)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(sink.Bytes(), f.mod) {
				t.Fatalf("pulled %d bytes, want the module's %d", sink.Len(), len(f.mod))
			}
			if len(sink.started) != 1 {
				t.Fatalf("Started called %d times, want once", len(sink.started))
			}
			layer := sink.started[0]
			if layer.Digest != mod.Layer {
				t.Errorf("Started with layer %s, the module came from %s", layer.Digest, mod.Layer)
			}
			if sink.atStart != 0 {
				t.Errorf("%d bytes received before Started", sink.atStart)
			}
			if got := sink.received.Load(); got != layer.Size {
				t.Errorf("received %d bytes, the layer is %d", got, layer.Size)
			}
			if layout == registrytest.LayoutCNCF && layer.Size != int64(len(f.mod)) {
				t.Errorf("raw layer of %d bytes for a %d-byte module", layer.Size, len(f.mod))
			}
		})
	}
}
