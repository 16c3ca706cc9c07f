// Command demo runs wasm-csi's main job end to end on this machine: a local
// OCI registry, the sample module pushed to it, the real daemon, two pods'
// inline volumes published the way kubelet publishes them, the mounted file
// shown, and everything cleaned up. `make demo` runs it (as root, or in a
// user and mount namespace of its own when not root).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

func main() {
	driver := flag.String("driver", "bin/wasm-csi-driver", "the daemon binary")
	module := flag.String("module", "test/testdata/plugin.wasm", "the module to push and mount")
	flag.Parse()
	if err := run(*driver, *module); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
	fmt.Println("\ndemo OK: everything stopped, unmounted and removed")
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }

func run(driver, module string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	work, err := os.MkdirTemp("", "wasm-csi-demo-")
	if err != nil {
		return err
	}
	defer func() {
		// The store's read-only views are overlay mounts: unmount them
		// (the daemon is stopped by then), then remove everything.
		if err := harness.UnmountUnder(work); err != nil {
			fmt.Fprintln(os.Stderr, "demo cleanup:", err)
		}
		os.RemoveAll(work)
	}()

	step("starting a local OCI registry (distribution)")
	reg, err := registrytest.Start(ctx, registrytest.Options{})
	if err != nil {
		return err
	}
	defer reg.Close()
	// The daemon pulls through the registry's counting proxy, so the demo
	// can show how many times the module was downloaded.
	image := reg.ProxyHost() + "/demo/header-filter:1.0.0"
	fmt.Println("registry at", reg.Host(), "counting proxy at", reg.ProxyHost())

	step("pushing %s as %s (CNCF Wasm artifact layout)", module, image)
	body, err := os.ReadFile(module)
	if err != nil {
		return err
	}
	desc, err := registrytest.PushWasm(ctx, reg.Host()+"/demo/header-filter:1.0.0", body, registrytest.LayoutCNCF, registrytest.WithPlainHTTP(true))
	if err != nil {
		return err
	}
	sum := sha256.Sum256(body)
	fmt.Printf("manifest %s, module sha256 %s (%d bytes)\n", desc.Digest, hex.EncodeToString(sum[:]), len(body))

	step("starting wasm-csi-driver")
	sock := filepath.Join(work, "csi.sock")
	root := filepath.Join(work, "store")
	cmd := exec.Command(driver, "--endpoint=unix://"+sock, "--node-id=demo-node", "--root-dir="+root,
		"--insecure-registry="+reg.ProxyHost(), "--log-format=text", "--metrics-address=127.0.0.1:0")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stdout
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	id, nodeClient := csipb.NewIdentityClient(conn), csipb.NewNodeClient(conn)
	for {
		info, err := id.GetPluginInfo(ctx, &csipb.GetPluginInfoRequest{})
		if err == nil {
			fmt.Printf("driver %s %s is serving on %s\n", info.Name, info.VendorVersion, sock)
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("driver did not start: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	kubelet := filepath.Join(work, "kubelet")
	var targets []string
	for i, pod := range []string{"gateway-a", "gateway-b"} {
		uid := fmt.Sprintf("0000000%d-demo-pod", i)
		target := filepath.Join(kubelet, "pods", uid, "volumes", "kubernetes.io~csi", "filter", "mount")
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return err
		}
		step("kubelet publishes the inline volume of pod %s", pod)
		start := time.Now()
		_, err := nodeClient.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{
			VolumeId:   "csi-demo-" + pod,
			TargetPath: target,
			VolumeCapability: &csipb.VolumeCapability{
				AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
				AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY},
			},
			Readonly: true,
			VolumeContext: map[string]string{
				"image":                                  image,
				"fileName":                               "header.wasm",
				"csi.storage.k8s.io/ephemeral":           "true",
				"csi.storage.k8s.io/pod.name":            pod,
				"csi.storage.k8s.io/pod.namespace":       "istio-system",
				"csi.storage.k8s.io/pod.uid":             uid,
				"csi.storage.k8s.io/serviceAccount.name": "istio-ingressgateway",
			},
		})
		if err != nil {
			return fmt.Errorf("publish for %s: %w", pod, err)
		}
		file := filepath.Join(target, "header.wasm")
		got, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		gs := sha256.Sum256(got)
		var st syscall.Stat_t
		if err := syscall.Stat(file, &st); err != nil {
			return err
		}
		fmt.Printf("published in %s: %s\n  %d bytes, sha256 %s, inode %d\n", time.Since(start).Round(time.Microsecond), file, len(got), hex.EncodeToString(gs[:]), st.Ino)
		if gs != sum {
			return errors.New("the mounted module differs from the pushed one")
		}
		if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
			fmt.Println("  a write is refused:", err)
		} else {
			return errors.New("the mounted module is writable")
		}
		targets = append(targets, target)
	}
	fmt.Printf("\nregistry blob downloads for both pods: %d (one per node)\n", reg.TotalBlobGets())

	for i, target := range targets {
		step("kubelet unpublishes the volume of pod %d", i)
		if _, err := nodeClient.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("csi-demo-gateway-%c", 'a'+i), TargetPath: target}); err != nil {
			return err
		}
		if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("target %s still there after unpublish", target)
		}
		fmt.Println("unmounted and removed", target)
	}
	return nil
}
