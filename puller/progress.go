package puller

import (
	"io"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ProgressSink is a Sink that follows its download. Started is told the
// layer about to be fetched (its Size is what the download reads), and
// Received the number of the layer's bytes read from the registry, as they
// arrive. Received is called from the goroutine that reads the network, at
// the same time as Write is called from another: it must be safe for that.
type ProgressSink interface {
	Sink
	Started(layer ocispec.Descriptor)
	Received(n int64)
}

// progressBody counts a layer's body as it is read.
type progressBody struct {
	io.ReadCloser
	sink ProgressSink
}

func (b *progressBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.sink.Received(int64(n))
	}
	return n, err
}
