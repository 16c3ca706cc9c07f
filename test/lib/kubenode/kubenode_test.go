package kubenode

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
)

// TestMountOf mounts for real what the driver mounts (a read-only bind
// mount, flags on the mount; a read-only overlay, read-only in its
// superblock) on paths with a space, and reads them back.
func TestMountOf(t *testing.T) {
	harness.RequireRoot(t)
	dir := t.TempDir()
	src, lower, bind, ovl := filepath.Join(dir, "src"), filepath.Join(dir, "lower"), filepath.Join(dir, "bind target"), filepath.Join(dir, "overlay target")
	for _, d := range []string{src, lower, bind, ovl} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok, err := MountOf(bind); ok || err != nil {
		t.Fatalf("MountOf(%q) before mounting: ok=%v err=%v", bind, ok, err)
	}
	if err := unix.Mount(src, bind, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(bind, unix.MNT_DETACH) })
	if err := unix.Mount("", bind, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("overlay", ovl, "overlay", unix.MS_NOSUID|unix.MS_NODEV, "lowerdir="+lower+":"+src); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(ovl, unix.MNT_DETACH) })

	for _, target := range []string{bind, ovl} {
		m, ok, err := MountOf(target)
		if !ok || err != nil {
			t.Fatalf("MountOf(%q): ok=%v err=%v", target, ok, err)
		}
		t.Logf("%s (per-mount %q, superblock %q)", m, m.Options, m.VFSOptions)
		if m.Mountpoint != target {
			t.Errorf("MountOf(%q).Mountpoint = %q", target, m.Mountpoint)
		}
		for _, want := range []string{"ro", "nosuid", "nodev"} {
			if !slices.Contains(m.Opts(), want) {
				t.Errorf("%s: options %v lack %q", m, m.Opts(), want)
			}
		}
	}
	mps, err := MountPoints()
	if err != nil {
		t.Fatal(err)
	}
	if !mps[bind] || !mps[ovl] || mps[src] {
		t.Errorf("MountPoints: bind %v overlay %v source %v; want true true false", mps[bind], mps[ovl], mps[src])
	}

	if err := unix.Unmount(bind, 0); err != nil {
		t.Fatal(err)
	}
	if m, ok, err := MountOf(bind); ok || err != nil {
		t.Errorf("MountOf(%q) after unmounting: %s ok=%v err=%v", bind, m, ok, err)
	}
}

func TestPodState(t *testing.T) {
	p := &corev1.Pod{Status: corev1.PodStatus{
		Phase:      corev1.PodRunning,
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
		InitContainerStatuses: []corev1.ContainerStatus{{Name: "copy",
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Reason: "Completed"}}}},
		ContainerStatuses: []corev1.ContainerStatus{{Name: "gateway", Ready: true, RestartCount: 1,
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}},
	}}
	if !PodReady(p) {
		t.Error("PodReady = false for a Running pod with Ready=True")
	}
	if got, want := PodState(p), "Running copy:terminated(Completed, exit 0) gateway:running(ready=true, restarts=1)"; got != want {
		t.Errorf("PodState = %q, want %q", got, want)
	}
	p.Status.Phase = corev1.PodPending
	p.Status.InitContainerStatuses = nil
	p.Status.ContainerStatuses[0].State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating", Message: "mounting"}}
	if PodReady(p) {
		t.Error("PodReady = true for a Pending pod")
	}
	if got, want := PodState(p), "Pending gateway:waiting(ContainerCreating: mounting)"; got != want {
		t.Errorf("PodState = %q, want %q", got, want)
	}
}
