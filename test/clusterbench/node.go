package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The node's side: CPU time of its daemons, disk bytes under its
// directories, the load average, and emptying the runtime of the
// benchmark's images. Read from /proc, cgroupfs and the file systems
// directly (the benchmark runs on the node, as root).

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// procCPU returns the CPU seconds (user+system, plus those of its waited-for
// children) of process pid.
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: fields count from after ")".
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
	if len(f) < 15 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	var ticks float64
	for _, k := range []int{11, 12, 13, 14} {
		v, err := strconv.ParseFloat(f[k], 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat field %d: %w", pid, k+3, err)
		}
		ticks += v
	}
	return ticks / clockTicks, nil
}

// pidFile reads test/e2e/cluster.sh's "<pid> <binary>" pid files.
func pidFile(runDir, name string) (pid int, bin string, err error) {
	b, err := os.ReadFile(filepath.Join(runDir, name+".pid"))
	if err != nil {
		return 0, "", err
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, "", fmt.Errorf("%s.pid: %q", name, b)
	}
	pid, err = strconv.Atoi(f[0])
	return pid, f[1], err
}

// shimsCPU sums the CPU seconds of the running shims of containerd (their
// binary is shimBin), by pid. Shims run runc and are waited for, so runc's
// time is in theirs.
func shimsCPU(shimBin string) map[int]float64 {
	out := map[int]float64{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil || strings.TrimSuffix(exe, " (deleted)") != shimBin {
			continue
		}
		if s, err := procCPU(pid); err == nil {
			out[pid] = s
		}
	}
	return out
}

// podCgroupCPU returns the CPU seconds used by every container of the pod
// with this UID, from its cgroup (cgroupfs driver, v1 cpuacct or v2).
func podCgroupCPU(uid string) (float64, error) {
	dir, v2, err := findPodCgroup(uid)
	if err != nil {
		return 0, err
	}
	if !v2 {
		b, err := os.ReadFile(filepath.Join(dir, "cpuacct.usage"))
		if err != nil {
			return 0, err
		}
		ns, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
		return ns / 1e9, err
	}
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			us, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return us / 1e6, err
		}
	}
	return 0, fmt.Errorf("%s/cpu.stat has no usage_usec", dir)
}

func findPodCgroup(uid string) (dir string, v2 bool, err error) {
	name := "pod" + uid
	roots := []struct {
		path string
		v2   bool
	}{
		{"/sys/fs/cgroup/cpu,cpuacct/kubepods", false},
		{"/sys/fs/cgroup/cpuacct/kubepods", false},
		{"/sys/fs/cgroup/kubepods", true},
	}
	for _, r := range roots {
		if _, err := os.Stat(r.path); err != nil {
			continue
		}
		found := ""
		_ = filepath.WalkDir(r.path, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			if d.Name() == name {
				found = p
				return filepath.SkipAll
			}
			if strings.HasPrefix(d.Name(), "pod") {
				return filepath.SkipDir // another pod's containers
			}
			return nil
		})
		if found != "" {
			return found, r.v2, nil
		}
	}
	return "", false, fmt.Errorf("no cgroup pod%s under kubepods", uid)
}

// loadAvg returns the 1, 5 and 15 minute load averages.
func loadAvg() [3]float64 {
	var l [3]float64
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return l
	}
	f := strings.Fields(string(b))
	for i := 0; i < 3 && i < len(f); i++ {
		l[i], _ = strconv.ParseFloat(f[i], 64)
	}
	return l
}

// diskUsage is what `du` counts: the blocks allocated to the files and
// directories under root, each inode once, not descending into other mounts
// (a pod's volumes, an overlay) or other file systems.
func diskUsage(root string, mounts map[string]bool) (int64, error) {
	st, err := os.Lstat(root)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil
		}
		return 0, err
	}
	dev := st.Sys().(*syscall.Stat_t).Dev
	type ino struct{ dev, ino uint64 }
	seen := map[ino]bool{}
	var total int64
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed meanwhile
			}
			return nil // unreadable: not counted
		}
		if p != root && d.IsDir() && mounts[p] {
			return filepath.SkipDir
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		s := info.Sys().(*syscall.Stat_t)
		if s.Dev != dev {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		k := ino{uint64(s.Dev), s.Ino}
		if seen[k] {
			return nil
		}
		seen[k] = true
		total += s.Blocks * 512
		return nil
	})
	return total, err
}

// ctr runs containerd's ctr against the cluster's containerd, in the
// namespace kubelet's containers live in.
type ctr struct {
	bin, sock string
}

func (c ctr) run(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, append([]string{"--address", c.sock, "-n", "k8s.io"}, args...)...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out.String(), nil
}

// containersOf lists the containerd containers (not sandboxes) kubelet made
// for pods of namespace ns.
func (c ctr) containersOf(ctx context.Context, ns string) ([]string, error) {
	out, err := c.run(ctx, "containers", "ls", "-q",
		fmt.Sprintf(`labels."io.kubernetes.pod.namespace"==%s,labels."io.cri-containerd.kind"==container`, ns))
	if err != nil {
		return nil, err
	}
	return strings.Fields(out), nil
}

// removeImagesOf removes every image reference that points at what a
// reference under prefix (the benchmark's registry) points at, including the
// runtime's "sha256:<id>" references of those images, and waits for
// containerd's garbage collection to drop their content and snapshots.
// It returns the references removed.
func (c ctr) removeImagesOf(ctx context.Context, prefix string) ([]string, error) {
	out, err := c.run(ctx, "images", "ls")
	if err != nil {
		return nil, err
	}
	type ref struct{ name, target string }
	var refs []ref
	targets := map[string]bool{}
	for i, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) < 3 {
			continue // header
		}
		refs = append(refs, ref{f[0], f[2]})
		if strings.HasPrefix(f[0], prefix) {
			targets[f[2]] = true
		}
	}
	var rm []string
	for _, r := range refs {
		if targets[r.target] {
			rm = append(rm, r.name)
		}
	}
	if len(rm) == 0 {
		return nil, nil
	}
	_, err = c.run(ctx, append([]string{"images", "rm", "--sync"}, rm...)...)
	return rm, err
}
