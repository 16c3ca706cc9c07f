// Package mount makes and removes the mounts pods see: the read-only
// overlay of a module's view and the read-only bind mount of it at a pod's
// target path, with mount(2) and umount(2).
//
// It owns: mount flags (ro, nosuid, nodev, and the ones the kernel locks)
// and the overlayfs option string.
//
// It must not: decide what to mount (the node's Service does), create or
// delete files in the store, or run mount(8)/umount(8) binaries.
package mount

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
	mountutils "k8s.io/mount-utils"
)

// Mounter makes and removes the read-only bind mounts pods see.
//
// It calls mount(2) and umount(2) directly rather than mount-utils' Mounter,
// which runs the mount(8) and umount(8) binaries: the driver's image is a
// static binary with no util-linux, and the syscalls say exactly which flags
// are set. mount-utils still answers "is this a mount point".
type Mounter struct {
	probe *mountutils.Mounter
}

// New returns a Mounter.
func New() *Mounter {
	return &Mounter{probe: mountutils.New("").(*mountutils.Mounter)}
}

// BindReadOnly bind-mounts the directory src at target, then remounts it
// read-only, nosuid and nodev. Flags the kernel locks on src's mount (in a
// user namespace: noexec, atime flags) are kept, or the remount would fail.
func (m *Mounter) BindReadOnly(src, target string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(src, &st); err != nil {
		return &os.PathError{Op: "statfs", Path: src, Err: err}
	}
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return &os.PathError{Op: "bind mount " + src + " on", Path: target, Err: err}
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	keep := uintptr(unix.MS_NOEXEC | unix.MS_NOATIME | unix.MS_NODIRATIME | unix.MS_RELATIME)
	flags |= uintptr(st.Flags) & keep
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		return &os.PathError{Op: "remount read-only", Path: target, Err: err}
	}
	return nil
}

// MountReadOnlyView mounts dir at at as an overlayfs with no upper layer
// (dir over the empty directory empty): its superblock is read-only, so no
// later remount, ours, kubelet's or the container runtime's (runc remounts
// a pod's bind mount rw when the volume is not readOnly), can make the
// module writable. A bind-mount's ro flag alone does not hold: it is a
// per-mount flag, set in the driver's mount namespace, and is neither
// propagated to the host's copy nor kept by a remount. It is idempotent:
// an existing mount at at is kept. dir and empty must not contain ':' ','
// or '\' (the store names them by hashes).
func (m *Mounter) MountReadOnlyView(dir, empty, at string) error {
	if mounted, err := m.IsMountPoint(at); err != nil {
		return err
	} else if mounted {
		return nil
	}
	if err := os.MkdirAll(at, 0o755); err != nil {
		return err
	}
	opts := "lowerdir=" + overlayEscape(dir) + ":" + overlayEscape(empty)
	if err := unix.Mount("overlay", at, "overlay", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return &os.PathError{Op: "mount read-only overlay of " + dir + " on", Path: at, Err: err}
	}
	return nil
}

// overlayEscape escapes a path for overlayfs' option string, which splits
// options at ',' and layers at ':' and takes '\\' as an escape.
// Store paths rarely hold one: they are returned as they are, without
// building a strings.Replacer (6 KiB) per publish.
func overlayEscape(p string) string {
	if !strings.ContainsAny(p, `\,:`) {
		return p
	}
	return strings.NewReplacer(`\`, `\\`, ",", `\,`, ":", `\:`).Replace(p)
}

// IsMountPoint reports whether p is a mount point. A missing p is not.
func (m *Mounter) IsMountPoint(p string) (bool, error) {
	ok, err := m.probe.IsMountPoint(p)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return ok, err
}

// Unmount removes every mount stacked on target. Not mounted is success.
func (m *Mounter) Unmount(target string) error {
	for i := 0; i < 16; i++ {
		mounted, err := m.IsMountPoint(target)
		if err != nil {
			return fmt.Errorf("checking mount point %s: %w", target, err)
		}
		if !mounted {
			return nil
		}
		if err := unix.Unmount(target, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return &os.PathError{Op: "unmount", Path: target, Err: err}
		}
	}
	return fmt.Errorf("unmount %s: still mounted after 16 unmounts", target)
}

// EnsureReadOnly remounts the mount at target read-only, nosuid and nodev
// if it is not all three, keeping the flags the kernel may lock (noexec and
// the atime flags). It reports whether it remounted.
func (m *Mounter) EnsureReadOnly(target string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		return false, &os.PathError{Op: "statfs", Path: target, Err: err}
	}
	want := int64(unix.ST_RDONLY | unix.ST_NOSUID | unix.ST_NODEV)
	if st.Flags&want == want {
		return false, nil
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	for _, f := range []struct{ st, ms int64 }{
		{unix.ST_NOEXEC, unix.MS_NOEXEC},
		{unix.ST_NOATIME, unix.MS_NOATIME},
		{unix.ST_NODIRATIME, unix.MS_NODIRATIME},
		{unix.ST_RELATIME, unix.MS_RELATIME},
	} {
		if st.Flags&f.st != 0 {
			flags |= uintptr(f.ms)
		}
	}
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		return false, &os.PathError{Op: "remount read-only", Path: target, Err: err}
	}
	return true, nil
}
