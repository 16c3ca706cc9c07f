package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/inspect"
	"github.com/wasm-csi/wasm-csi/node/store"
)

// InspectConfig is what `wasm-csi-driver inspect` flags say.
type InspectConfig struct {
	RootDir    string
	ConfigFile string
	Output     string
}

func parseInspectFlags(args []string, out io.Writer) (InspectConfig, error) {
	var c InspectConfig
	fs := flag.NewFlagSet("wasm-csi-driver inspect", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprintln(out, "usage: wasm-csi-driver inspect [--root-dir=DIR] [--config=FILE] [-o table|json]")
		fmt.Fprintln(out, "What the node's store holds, read from --root-dir without a running daemon and without changing anything.")
		fs.PrintDefaults()
	}
	fs.StringVar(&c.RootDir, "root-dir", "/var/lib/wasm-csi", "the driver's --root-dir")
	fs.StringVar(&c.ConfigFile, "config", "/etc/wasm-csi/config.yaml", "the driver's --config, for what GC would remove next (missing: the defaults)")
	fs.StringVar(&c.Output, "o", "table", "output: "+strings.Join(inspect.Formats, " or "))
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	return c, nil
}

// runInspect wires the read-only store, the config's GC policy and the
// renderer.
func runInspect(c InspectConfig, out, errOut io.Writer) error {
	var fc config.FileConfig
	if data, err := os.ReadFile(c.ConfigFile); err == nil {
		if fc, err = config.ParseFileConfig(data); err != nil {
			return fmt.Errorf("--config %s: %w", c.ConfigFile, err)
		}
	} else if !os.IsNotExist(err) {
		return fmt.Errorf("--config: %w", err)
	}
	policy, err := fc.GCPolicy()
	if err != nil {
		return err
	}
	st, err := store.OpenReadOnly(c.RootDir)
	if err != nil {
		return err
	}
	// The verification policies read key files: one that cannot be read
	// leaves the table with what is recorded, not the whole inspect.
	var opts inspect.Options
	if ps, err := fc.VerificationPolicies(); err != nil {
		fmt.Fprintf(errOut, "wasm-csi-driver inspect: --config %s: verification policies not read (%v); VERIFIED shows the recorded passes only\n", c.ConfigFile, err)
	} else if !ps.Empty() {
		opts.Policies = ps
	}
	now := time.Now()
	inv, err := st.Inventory(policy, now)
	if err != nil {
		return err
	}
	return inspect.Write(out, inv, c.Output, now, opts)
}
