package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// validationFixture is a module pushed to its own repository.
type validationFixture struct {
	name   string
	mod    []byte
	layout registrytest.Layout
	// rule is what a refusal under proxy-wasm says: the rule it broke.
	rule []string
	repo string
}

// TestValidation: modules are checked once, when stored, before any pod
// sees them. One daemon goes through the three validation modes by live
// changes of its config file (never restarted): by default (no validation
// key: proxy-wasm) the sample module publishes, and garbage, a truncated
// module, one without a proxy_abi_version_* export, one with an unknown env
// import and one without a memory export are refused with
// FailedPrecondition and a message naming the rule; none of them stays in
// the store, and a refused image published again is refused again and
// downloaded again (it was not half stored). With "validation: wasm" the
// proxy-wasm rules are dropped; with "validation: none" only the header
// counts. Back to the default, the rules hold again for modules stored
// from then on.
func TestValidation(t *testing.T) {
	t.Parallel()
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfgPath, "# defaults: no validation key\n")
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.ProxyHost(), "--config=" + cfgPath}})

	sample, err := os.ReadFile("../testdata/plugin.wasm")
	if err != nil {
		t.Fatal(err)
	}
	// The fixtures are unique to this test (their digests too, so the
	// registry's counts are this test's), except the committed sample.
	opts := func(name string) wasmgen.Options { return wasmgen.Options{Message: t.Name() + " " + name} }
	noABI := opts("no ABI export")
	noABI.OmitABIExport = true
	unknownImport := opts("unknown env import")
	unknownImport.ExtraEnvImport = "not_a_proxy_wasm_function"
	noMemory := opts("no memory export")
	noMemory.OmitMemoryExport = true
	fixtures := []*validationFixture{
		{name: "garbage", mod: append(wasmgen.Garbage(4096), t.Name()...), layout: registrytest.LayoutCNCF,
			rule: []string{"does not start with the Wasm magic and version"}},
		{name: "truncated", mod: validationTruncate(t, wasmgen.ProxyWasm(opts("truncated"))), layout: registrytest.LayoutOCIGzip,
			rule: []string{"is truncated"}},
		{name: "no-abi", mod: wasmgen.ProxyWasm(noABI), layout: registrytest.LayoutCNCF,
			rule: []string{"does not export a proxy_abi_version_* function"}},
		{name: "unknown-import", mod: wasmgen.ProxyWasm(unknownImport), layout: registrytest.LayoutDockerZstd,
			rule: []string{"imports env.not_a_proxy_wasm_function", "which Envoy does not provide"}},
		{name: "no-memory", mod: wasmgen.ProxyWasm(noMemory), layout: registrytest.LayoutSolo,
			rule: []string{"does not export its memory"}},
	}
	byName := map[string]*validationFixture{}
	for _, f := range fixtures {
		f.repo = repoName(t, f.name)
		push(t, f.repo+":1", f.mod, f.layout)
		byName[f.name] = f
	}
	sampleRepo := repoName(t, "sample")
	push(t, sampleRepo+":1", sample, registrytest.LayoutCNCF)

	// published publishes img for a new pod, checks the volume shows mod,
	// and unpublishes.
	published := func(t *testing.T, img string, mod []byte) {
		t.Helper()
		req := e.mustPublish(img, nil)
		checkFile(t, req, "plugin.wasm", mod)
		e.mustUnpublish(req)
	}
	// refused publishes f's image under tag for a new pod and checks it is
	// refused as the rule says, and nothing of the module is stored.
	refused := func(t *testing.T, f *validationFixture, tag string, rule ...string) {
		t.Helper()
		img := image(f.repo + ":" + tag)
		req := e.request(harness.NewPod("refused"), "filter", map[string]string{"image": img})
		wantCode(t, e.publish(req), codes.FailedPrecondition, append([]string{img}, rule...)...)
		checkGone(t, req.TargetPath)
		if _, err := os.Stat(filepath.Join(e.blobDir(), digest.FromBytes(f.mod).Encoded())); !os.IsNotExist(err) {
			t.Errorf("the refused module %s is in the store (stat: %v)", f.name, err)
		}
		for _, name := range e.storedBlobs() {
			if strings.HasPrefix(name, ".tmp-") {
				t.Errorf("temp file blobs/sha256/%s left by a refused module", name)
			}
		}
	}

	t.Run("proxy-wasm", func(t *testing.T) {
		published(t, image(sampleRepo+":1"), sample)
		refs := validationRecords(t, e)
		for _, f := range fixtures {
			refused(t, f, "1", f.rule...)
			if n := reg.BlobGets(validationLayer(t, f)); n != 1 {
				t.Errorf("%s: the module was downloaded %d times, want 1", f.name, n)
			}
		}
		// Again: the same image (answered from its damping or pulled
		// anew, refused either way), and the same manifest under a new
		// tag, which nothing on the node knows: downloaded and checked
		// again, not served from a half-stored state.
		for _, f := range fixtures {
			refused(t, f, "1", f.rule...)
			if _, err := registrytest.PushWasm(t.Context(), reg.Host()+"/"+f.repo+":1", f.mod, f.layout, registrytest.WithTags("again")); err != nil {
				t.Fatal(err)
			}
			before := reg.BlobGets(validationLayer(t, f))
			refused(t, f, "again", f.rule...)
			if n := reg.BlobGets(validationLayer(t, f)); n != before+1 {
				t.Errorf("%s: published under a new tag, the module was downloaded %d more times, want 1", f.name, n-before)
			}
		}
		if got := validationRecords(t, e); got != refs {
			t.Errorf("refused modules left records: refs/ and volumes/ hold %q, had %q", got, refs)
		}
		e.checkStoreIntegrity()
	})

	t.Run("wasm", func(t *testing.T) {
		validationReload(t, e, cfgPath, "validation: wasm\n", "wasm")
		// The modules refused for proxy-wasm rules now publish, by the
		// very images refused a moment ago.
		for _, name := range []string{"no-abi", "unknown-import", "no-memory"} {
			published(t, image(byName[name].repo+":1"), byName[name].mod)
		}
		refused(t, byName["garbage"], "1", "does not start with the Wasm magic and version")
		refused(t, byName["truncated"], "1", "is truncated")
	})

	t.Run("none", func(t *testing.T) {
		validationReload(t, e, cfgPath, "validation: none\n", "none")
		// Only the header counts: a truncated module with a valid header
		// publishes, garbage does not.
		published(t, image(byName["truncated"].repo+":1"), byName["truncated"].mod)
		refused(t, byName["garbage"], "1", "does not start with the Wasm magic and version")
	})

	t.Run("back-to-default", func(t *testing.T) {
		validationReload(t, e, cfgPath, "# defaults again\n", "")
		// The rules hold again for a module stored from now on...
		another := opts("another unknown env import")
		another.ExtraEnvImport = "wasm_csi_no_such_host_function"
		f := &validationFixture{name: "another-unknown-import", mod: wasmgen.ProxyWasm(another), layout: registrytest.LayoutOCITar,
			repo: repoName(t, "another")}
		push(t, f.repo+":1", f.mod, f.layout)
		refused(t, f, "1", "imports env.wasm_csi_no_such_host_function", "which Envoy does not provide")
		// ...while a module is checked once, when stored: the truncated
		// one stored under "none" is on the node and publishes without a
		// download.
		tr := byName["truncated"]
		before := reg.BlobGets(validationLayer(t, tr))
		published(t, image(tr.repo+":1"), tr.mod)
		if n := reg.BlobGets(validationLayer(t, tr)); n != before {
			t.Errorf("a stored module was downloaded again")
		}
	})
	if t.Failed() {
		return
	}
	e.checkStoreIntegrity()
}

// validationReload writes body as the config file and waits until the
// daemon logged that it loaded it, with this validation mode.
func validationReload(t *testing.T, e *env, path, body, mode string) {
	t.Helper()
	loads := countLog(e.d, `"msg":"config loaded"`)
	writeConfig(t, path, body)
	want := `"validation":"` + mode + `"`
	eventually(t, "the daemon to load "+strings.TrimSpace(body), func() bool {
		logs := e.d.Logs()
		if strings.Count(logs, `"msg":"config loaded"`) <= loads {
			return false
		}
		i := strings.LastIndex(logs, `"msg":"config loaded"`)
		line, _, _ := strings.Cut(logs[i:], "\n")
		return strings.Contains(line, want)
	})
}

// validationRecords lists the store's reference and volume records.
func validationRecords(t *testing.T, e *env) string {
	t.Helper()
	var names []string
	for _, dir := range []string{"refs", "volumes"} {
		entries, err := os.ReadDir(filepath.Join(e.d.Root, dir))
		if err != nil {
			t.Fatal(err)
		}
		for _, en := range entries {
			names = append(names, dir+"/"+en.Name())
		}
	}
	return strings.Join(names, " ")
}

// validationLayer is the digest of the layer holding f's module.
func validationLayer(t *testing.T, f *validationFixture) digest.Digest {
	t.Helper()
	if !f.layout.IsContainerImage() {
		return digest.FromBytes(f.mod)
	}
	desc, err := registrytest.Repository(reg.Host() + "/" + f.repo + ":1")
	if err != nil {
		t.Fatal(err)
	}
	d, err := desc.Resolve(t.Context(), "1")
	if err != nil {
		t.Fatal(err)
	}
	_, layers := manifestBlobs(t, f.repo, d)
	return layers[len(layers)-1]
}

// validationTruncate cuts mod in the middle of its last section, so its
// header is valid and a section runs past the end of the file.
func validationTruncate(t *testing.T, mod []byte) []byte {
	t.Helper()
	secs, err := wasmgen.Sections(mod)
	if err != nil || len(secs) == 0 || len(mod)-secs[len(secs)-1].Start < 4 {
		t.Fatalf("cannot find the last section of a %d-byte module: %v", len(mod), err)
	}
	last := secs[len(secs)-1].Start
	return mod[:last+(len(mod)-last)/2]
}
