package main

import (
	"io"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/node/progress"
)

func TestPullProgressFlags(t *testing.T) {
	c, err := parseFlags([]string{"--node-id=n"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.PullProgressSize != progress.DefaultMinSize || c.PullProgressInterval != progress.DefaultInterval {
		t.Errorf("defaults: %d, %s", c.PullProgressSize, c.PullProgressInterval)
	}
	c, err = parseFlags([]string{"--node-id=n", "--pull-progress-size=4Mi", "--pull-progress-interval=1s"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.PullProgressSize != 4<<20 || c.PullProgressInterval != time.Second {
		t.Errorf("4Mi, 1s: %d, %s", c.PullProgressSize, c.PullProgressInterval)
	}
	for _, bad := range [][]string{{"--pull-progress-size=lots"}, {"--pull-progress-size=-1Mi"}, {"--pull-progress-interval=-1s"}} {
		if _, err := parseFlags(append([]string{"--node-id=n"}, bad...), io.Discard); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}
