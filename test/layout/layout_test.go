// Package layout holds the README's "Development" section to the code: the
// list of which package imports which is what the Go sources say, so the
// picture a new engineer reads first cannot drift from the tree.
//
// Needs: nothing (no root, no registry, no apiserver); it reads the
// sources with go/build, as `go list` does for this machine's GOOS.
package layout

import (
	"errors"
	"go/build"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/wasm-csi/wasm-csi/"

// TestREADMEImports compares the README's "Exactly (`go list ...`)" block
// with the imports of every package under cmd, csi, node and puller.
func TestREADMEImports(t *testing.T) {
	root := filepath.Join("..", "..")
	want := map[string]string{} // package -> its imports of this module, ", "-joined
	for _, top := range []string{"cmd", "csi", "node", "puller"} {
		err := filepath.WalkDir(filepath.Join(root, top), func(dir string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return err
			}
			if name := d.Name(); name == "testdata" || strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") {
				return filepath.SkipDir
			}
			pkg, err := build.ImportDir(dir, 0)
			var noGo *build.NoGoError
			if errors.As(err, &noGo) {
				return nil
			}
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(root, dir)
			if err != nil {
				return err
			}
			var own []string
			for _, imp := range pkg.Imports {
				if p, ok := strings.CutPrefix(imp, module); ok {
					own = append(own, p)
				}
			}
			slices.Sort(own)
			want[filepath.ToSlash(rel)] = strings.Join(own, ", ")
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	got := readmeImports(t, string(readme))
	for pkg, imports := range want {
		line, ok := got[pkg]
		switch {
		case !ok:
			t.Errorf("README Development: %s is not listed; it imports %q", pkg, imports)
		case line != imports:
			t.Errorf("README Development: %s → %q, but it imports %q", pkg, line, imports)
		}
	}
	for pkg := range got {
		if _, ok := want[pkg]; !ok {
			t.Errorf("README Development lists %s, which is not a package", pkg)
		}
	}
}

// readmeImports parses the block after the line starting "Exactly (`go
// list": lines "PKG[, PKG...]  → IMPORT, IMPORT" or "→ nothing of this module".
func readmeImports(t *testing.T, readme string) map[string]string {
	t.Helper()
	_, after, ok := strings.Cut(readme, "\nExactly (`go list")
	if !ok {
		t.Fatal("README: no \"Exactly (`go list\" block in Development")
	}
	_, block, ok := strings.Cut(after, "\n```\n")
	if !ok {
		t.Fatal("README: the import list is not in a code block")
	}
	block, _, _ = strings.Cut(block, "\n```")
	out := map[string]string{}
	for _, line := range strings.Split(block, "\n") {
		left, right, ok := strings.Cut(line, "→")
		if !ok {
			t.Fatalf("README import list: %q has no →", line)
		}
		right = strings.TrimSpace(right)
		if right == "nothing of this module" {
			right = ""
		}
		for _, pkg := range strings.Split(left, ",") {
			out[strings.TrimSpace(pkg)] = right
		}
	}
	return out
}
