// Package inspect renders what a node's store holds (store.Inventory) for
// `wasm-csi-driver inspect`: a table for a person, JSON for a script.
//
// It owns: the output formats. It must not: read the store itself (the
// inventory comes from package store) or change anything.
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
)

// Formats are the values of -o.
var Formats = []string{"table", "json"}

// Write renders inv as format ("table" or "json"), with times in the
// table relative to now.
func Write(w io.Writer, inv store.Inventory, format string, now time.Time) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(inv)
	case "table", "":
		return table(w, inv, now)
	}
	return fmt.Errorf("output format %q is not one of %s", format, strings.Join(Formats, ", "))
}

func table(w io.Writer, inv store.Inventory, now time.Time) error {
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
			len(m.Volumes), next, verified(m.Verification), strings.Join(refs, ","))
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

// verified names the policies a module's manifests passed: "-" when no
// policy covered it, "no" when one did and it did not pass (served in warn
// mode). `-o json` has the signers and times.
func verified(vs []store.VerificationState) string {
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
