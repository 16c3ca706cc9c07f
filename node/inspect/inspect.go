// Package inspect renders what a node's store holds (store.Inventory) for
// `wasm-csi-driver inspect`: a table for a person, JSON for a script.
//
// It owns: the output formats. It must not: read the store itself (the
// inventory comes from package store) or change anything. The config's
// verification policies, when given, are only matched against, offline.
package inspect

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/verify"
)

// Formats are the values of -o.
var Formats = []string{"table", "json"}

// Options are what the table may add to the inventory.
type Options struct {
	// Policies, when set, are the config file's verification policies:
	// the table says, for each module, whether it passed the policy its
	// image matches now, or will be checked again before a pod gets it.
	Policies *verify.Policies
}

// Write renders inv as format ("table" or "json"), with times in the
// table relative to now.
func Write(w io.Writer, inv store.Inventory, format string, now time.Time, opts Options) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(inv)
	case "table", "":
		return table(w, inv, now, opts)
	}
	return fmt.Errorf("output format %q is not one of %s", format, strings.Join(Formats, ", "))
}

func table(w io.Writer, inv store.Inventory, now time.Time, opts Options) error {
	gcNext := map[string]int{}
	for i, d := range inv.GCNext {
		gcNext[d.String()] = i + 1
	}
	fmt.Fprintf(w, "STORE %s (format %d): %d modules, %d bytes; %d volumes\n\n", inv.Root, inv.Format, len(inv.Modules), inv.StoreBytes, len(inv.Volumes))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MODULE\tSIZE\tLAST USED\tVOLUMES\tGC NEXT\tVERIFIED\tREFS")
	for _, m := range inv.Modules {
		var refs []string
		for _, r := range m.Refs {
			refs = append(refs, r.Ref)
		}
		next := "-"
		if n, ok := gcNext[m.Digest.String()]; ok {
			next = fmt.Sprint(n)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s ago\t%d\t%s\t%s\t%s\n", short(m.Digest.String()), m.Size, now.Sub(m.LastUsed).Round(time.Second),
			len(m.Volumes), next, verified(m, opts.Policies), strings.Join(refs, ","))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VOLUME\tPOD\tIMAGE\tMODULE\tTARGET")
	for _, v := range inv.Volumes {
		pod := v.PodNS + "/" + v.PodName
		if v.PodName == "" {
			pod = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", short(v.VolumeID), pod, v.Image, short(v.Module.String()), v.TargetPath)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PULL IN FLIGHT\tWRITTEN\tOF\tSTARTED\tLAST WRITE\tMANIFEST")
	for _, p := range inv.Pulls {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s ago\t%s ago\t%s\n", p.Image, p.Written, p.Total, now.Sub(p.Started).Round(time.Second),
			now.Sub(p.LastWrite).Round(time.Second), short(p.Manifest.String()))
	}
	return tw.Flush()
}

// verified says how a module stands with signature policies. Without the
// config's policies: the policies its manifests passed, "-" when none
// covered it, "no" when one did and it did not pass (served in warn mode).
// With them, for each of its refs: the name of the policy its image matches
// now if it passed that policy as it is now, "NAME (re-check)" if it passed
// only an earlier version of it or another policy (checked again, offline,
// before the next pod gets it), "NAME (no)" if it did not pass, "denied"
// when no policy matches and unmatched is deny, "-" when none matches.
// `-o json` has the recorded signers and times.
func verified(m store.ModuleInfo, ps *verify.Policies) string {
	if ps != nil {
		return againstPolicies(m, ps)
	}
	vs := m.Verification
	if len(vs) == 0 {
		return "-"
	}
	var names []string
	for _, v := range vs {
		for _, p := range v.Passed {
			if !slices.Contains(names, p.Policy) {
				names = append(names, p.Policy)
			}
		}
	}
	if len(names) == 0 {
		return "no"
	}
	return strings.Join(names, ",")
}

func againstPolicies(m store.ModuleInfo, ps *verify.Policies) string {
	var out []string
	add := func(s string) {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	for _, r := range m.Refs {
		ref, err := puller.ParseReference(r.Ref)
		if err != nil {
			continue
		}
		p := ps.Match(ref.Registry, ref.Repository)
		switch {
		case p == nil && ps.DenyUnmatched:
			add("denied")
			continue
		case p == nil:
			add("-")
			continue
		}
		status := p.Name + " (no)"
		for _, v := range m.Verification {
			if v.Manifest != r.Manifest {
				continue
			}
			for _, pp := range v.Passed {
				if pp.Fingerprint == p.Fingerprint {
					status = p.Name
					break
				}
				status = p.Name + " (re-check)"
			}
		}
		add(status)
	}
	if len(out) == 0 {
		return "-"
	}
	return strings.Join(out, ",")
}

// short cuts a digest or volume id to a readable prefix, as docker does.
func short(s string) string {
	if i := strings.IndexByte(s, ':'); i >= 0 && len(s) > i+13 {
		return s[:i+13]
	}
	if len(s) > 16 {
		return s[:16]
	}
	return s
}
