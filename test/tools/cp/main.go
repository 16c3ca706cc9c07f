// Command cp is the copy step of the cluster benchmark's init-container way
// (test/clusterbench): `cp SRC DST` copies one file, as `cp` in a busybox
// init container does. It exists because these machines have no container
// engine to build a busybox image with; it is a static Go binary put in the
// init image beside the module.
package main

import (
	"fmt"
	"io"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: cp SRC DST")
		os.Exit(2)
	}
	n, err := copyFile(os.Args[1], os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, "cp:", err)
		os.Exit(1)
	}
	fmt.Printf("cp: copied %s to %s (%d bytes)\n", os.Args[1], os.Args[2], n)
}

func copyFile(src, dst string) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return n, err
}
