// Package upgrade replaces a released driver by the current one on the same
// store, as a DaemonSet rollout does on a node: the earlier driver is built
// from this repository at a fixed commit (git archive), publishes volumes,
// stops; the current driver starts on the same --root-dir. The earlier
// mounts still serve, their unpublish cleans up, stored modules are not
// downloaded again and new publishes work.
//
// Needs: root (real mounts), distribution's registry (bin/registry) and git
// history (the earlier driver is built with `git archive`).
package upgrade

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// fromCommit is the earlier driver: main on the day upgrades were first
// tested (before the store carried a format version).
const fromCommit = "388ba58"

// buildAt builds cmd/wasm-csi-driver as it was at commit into dir.
func buildAt(t *testing.T, commit, dir string) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	archive := exec.Command("git", "-C", root, "archive", "--format=tar", commit)
	var tarball, stderr bytes.Buffer
	archive.Stdout, archive.Stderr = &tarball, &stderr
	if err := archive.Run(); err != nil {
		t.Fatalf("git archive %s (the test needs the repository's history, not a shallow clone): %v\n%s", commit, err, stderr.String())
	}
	untar := exec.Command("tar", "-x", "-C", src)
	untar.Stdin = &tarball
	if out, err := untar.CombinedOutput(); err != nil {
		t.Fatalf("tar -x: %v\n%s", err, out)
	}
	bin := filepath.Join(dir, "wasm-csi-driver-"+commit)
	build := exec.Command("go", "build", "-o", bin, "./cmd/wasm-csi-driver")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-mod=mod")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the driver at %s: %v\n%s", commit, err, out)
	}
	return bin
}

type node struct {
	t *testing.T
	k *harness.Kubelet
}

func (n node) publish(d *harness.Daemon, pod, image string) (*csipb.NodePublishVolumeRequest, error) {
	req, err := n.k.PublishRequest(harness.NewPod(pod), "wasm", map[string]string{"image": image})
	if err != nil {
		n.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = d.Node.NodePublishVolume(ctx, req)
	return req, err
}

func (n node) unpublish(d *harness.Daemon, req *csipb.NodePublishVolumeRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := d.Node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: req.TargetPath})
	return err
}

func checkServes(t *testing.T, when string, req *csipb.NodePublishVolumeRequest, want []byte) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(req.TargetPath, "plugin.wasm"))
	if err != nil {
		t.Fatalf("%s: reading %s: %v", when, req.TargetPath, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %s holds %s, want %s", when, req.TargetPath, digest.FromBytes(got), digest.FromBytes(want))
	}
	if opts, _ := harness.MountOptions(req.TargetPath); !strings.HasPrefix(opts, "ro") {
		t.Errorf("%s: %s mounted %q, want read-only", when, req.TargetPath, opts)
	}
}

func TestUpgradeFromEarlierDriver(t *testing.T) {
	harness.RequireRoot(t)
	dir := t.TempDir()
	oldBin := buildAt(t, fromCommit, dir)
	newBin, err := harness.BuildDriver(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	reg := registrytest.StartT(t, registrytest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	mods := map[string][]byte{}
	images := map[string]string{}
	for _, name := range []string{"a", "b", "c"} {
		b := wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name() + " " + name})
		if _, err := registrytest.PushWasm(ctx, reg.Host()+"/upgrade/"+name+":1.0", b, registrytest.LayoutCNCF, registrytest.WithPlainHTTP(true)); err != nil {
			t.Fatal(err)
		}
		mods[name] = b
		images[name] = reg.ProxyHost() + "/upgrade/" + name + ":1.0"
	}
	root := filepath.Join(dir, "store")
	args := []string{"--insecure-registry=" + reg.ProxyHost()}
	n := node{t: t, k: harness.NewKubelet(t)}
	t.Cleanup(func() {
		if err := harness.UnmountUnder(n.k.Root); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})

	// The earlier driver publishes a and b (b for two pods).
	old := harness.StartDaemon(t, oldBin, harness.DaemonOptions{Root: root, Args: args})
	reqA, err := n.publish(old, "pod-a", images["a"])
	if err != nil {
		t.Fatalf("driver %s: publish a: %v", fromCommit, err)
	}
	reqB1, err := n.publish(old, "pod-b1", images["b"])
	if err != nil {
		t.Fatalf("driver %s: publish b: %v", fromCommit, err)
	}
	reqB2, err := n.publish(old, "pod-b2", images["b"])
	if err != nil {
		t.Fatalf("driver %s: publish b again: %v", fromCommit, err)
	}
	for _, r := range []struct {
		req *csipb.NodePublishVolumeRequest
		mod string
	}{{reqA, "a"}, {reqB1, "b"}, {reqB2, "b"}} {
		checkServes(t, "published by "+fromCommit, r.req, mods[r.mod])
	}
	gets := func(name string) int { return reg.BlobGets(digest.FromBytes(mods[name])) }
	if gets("a") != 1 || gets("b") != 1 {
		t.Fatalf("blob GETs a=%d b=%d before the upgrade, want 1 each", gets("a"), gets("b"))
	}
	old.Stop()
	t.Logf("driver %s stopped; its store:\n%s", fromCommit, listTree(t, root))

	// `wasm-csi-driver inspect` reads the earlier driver's store without a
	// daemon and changes nothing (not even the format record).
	before := listTree(t, root)
	inspectOut, err := exec.Command(newBin, "inspect", "--root-dir="+root, "--config=/nonexistent", "-o", "json").Output()
	if err != nil {
		t.Fatalf("inspect: %v", err)
	}
	var inv struct {
		Format  int `json:"format"`
		Modules []struct {
			Digest  string   `json:"digest"`
			Size    int64    `json:"size"`
			Volumes []string `json:"volumes"`
			Refs    []struct {
				Ref string `json:"ref"`
			} `json:"refs"`
		} `json:"modules"`
		Volumes []struct {
			VolumeID   string `json:"volumeID"`
			TargetPath string `json:"targetPath"`
			Image      string `json:"image"`
			PodName    string `json:"podName"`
		} `json:"volumes"`
	}
	if err := json.Unmarshal(inspectOut, &inv); err != nil {
		t.Fatalf("inspect -o json: %v\n%s", err, inspectOut)
	}
	if inv.Format != 0 || len(inv.Modules) != 2 || len(inv.Volumes) != 3 {
		t.Errorf("inspect of the %s store: format %d, %d modules, %d volumes; want 0, 2, 3:\n%s", fromCommit, inv.Format, len(inv.Modules), len(inv.Volumes), inspectOut)
	}
	for _, m := range inv.Modules {
		want := 1 // a
		if m.Digest == digest.FromBytes(mods["b"]).String() {
			want = 2
		}
		if len(m.Volumes) != want || len(m.Refs) == 0 || m.Size != int64(len(mods["a"])) && m.Size != int64(len(mods["b"])) {
			t.Errorf("inspect: module %s: %d volumes, refs %v, size %d", m.Digest, len(m.Volumes), m.Refs, m.Size)
		}
	}
	if after := listTree(t, root); after != before {
		t.Errorf("inspect changed the store:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	table, err := exec.Command(newBin, "inspect", "--root-dir="+root, "--config=/nonexistent").Output()
	if err != nil || !strings.Contains(string(table), "MODULE") || !strings.Contains(string(table), images["b"]) {
		t.Errorf("inspect (table): %v\n%s", err, table)
	}
	t.Logf("wasm-csi-driver inspect --root-dir=%s:\n%s", root, table)

	// The current driver on the same root: it migrates the store (format
	// version 0, no record) and records the version it wrote.
	cur := harness.StartDaemon(t, newBin, harness.DaemonOptions{Root: root, Args: args})
	if v := formatVersion(t, root); v != store.FormatVersion {
		t.Errorf("format.json after the upgrade: version %d, want %d", v, store.FormatVersion)
	}
	if !strings.Contains(cur.Logs(), `"msg":"store migrated"`) {
		t.Errorf("the current driver did not log the store's migration:\n%s", cur.Logs())
	}
	checkServes(t, "after the upgrade", reqA, mods["a"])
	checkServes(t, "after the upgrade", reqB1, mods["b"])

	// A new pod with a stored module: no download.
	reqA2, err := n.publish(cur, "pod-a2", images["a"])
	if err != nil {
		t.Fatalf("current driver: publish a (stored by %s): %v", fromCommit, err)
	}
	checkServes(t, "new pod, module stored by "+fromCommit, reqA2, mods["a"])
	if gets("a") != 1 {
		t.Errorf("module a downloaded again after the upgrade (%d blob GETs)", gets("a"))
	}
	// A new module.
	reqC, err := n.publish(cur, "pod-c", images["c"])
	if err != nil {
		t.Fatalf("current driver: publish c: %v", err)
	}
	checkServes(t, "new module after the upgrade", reqC, mods["c"])

	// Unpublish of volumes the earlier driver published cleans up.
	for _, req := range []*csipb.NodePublishVolumeRequest{reqA, reqB1} {
		if err := n.unpublish(cur, req); err != nil {
			t.Fatalf("current driver: unpublish %s (published by %s): %v", req.TargetPath, fromCommit, err)
		}
		if opts, _ := harness.MountOptions(req.TargetPath); opts != "" {
			t.Errorf("%s still mounted after unpublish", req.TargetPath)
		}
		if _, err := os.Lstat(req.TargetPath); !os.IsNotExist(err) {
			t.Errorf("%s still there after unpublish (%v)", req.TargetPath, err)
		}
	}
	// Five volumes published, two unpublished: three records left.
	if n := volumeRecords(t, root); n != 3 {
		t.Errorf("%d volume records after unpublishing 2 of 5 volumes, want 3", n)
	}
	// The other pod of b still reads its file.
	checkServes(t, "after the other b pod's unpublish", reqB2, mods["b"])
	for _, req := range []*csipb.NodePublishVolumeRequest{reqB2, reqA2, reqC} {
		if err := n.unpublish(cur, req); err != nil {
			t.Fatal(err)
		}
	}
	if n := volumeRecords(t, root); n != 0 {
		t.Errorf("%d volume records after every unpublish, want 0", n)
	}
	if logs := cur.Logs(); strings.Contains(logs, "WARNING: DATA RACE") {
		t.Errorf("data race in the current driver:\n%s", logs)
	}
	cur.Stop()

	// A driver older than its store refuses it: the store as a newer
	// driver would leave it (format version FormatVersion+1).
	newer := store.FormatVersion + 1
	fp := filepath.Join(root, "format.json")
	if err := os.Chmod(fp, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fp, []byte(fmt.Sprintf(`{"version":%d}`, newer)), 0o444); err != nil {
		t.Fatal(err)
	}
	before = listTree(t, root)
	runCtx, cancelRun := context.WithTimeout(context.Background(), time.Minute)
	defer cancelRun()
	refuse := exec.CommandContext(runCtx, newBin, "--endpoint=unix://"+filepath.Join(dir, "refuse.sock"), "--node-id=test-node",
		"--root-dir="+root, "--metrics-address=127.0.0.1:0")
	out, err := refuse.CombinedOutput()
	if err == nil {
		t.Fatalf("the driver started on a store of format version %d:\n%s", newer, out)
	}
	for _, want := range []string{fmt.Sprintf("format version %d", newer), "newer wasm-csi driver"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the refusal does not say %q:\n%s", want, out)
		}
	}
	if after := listTree(t, root); after != before {
		t.Errorf("the refused store was changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	t.Logf("driver on a format %d store: %v\n%s", newer, err, out)
}

// formatVersion reads the store's format record.
func formatVersion(t *testing.T, root string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "format.json"))
	if err != nil {
		t.Fatalf("format record: %v", err)
	}
	var rec struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatalf("format.json %q: %v", b, err)
	}
	return rec.Version
}

// volumeRecords counts the store's volume records (volumes/*.json).
func volumeRecords(t *testing.T, root string) int {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(root, "volumes", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	return len(m)
}

// listTree lists the files under dir, for the log.
func listTree(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		fmt.Fprintf(&b, "  %s %s %d\n", fi.Mode(), rel, fi.Size())
		return nil
	})
	return b.String()
}
