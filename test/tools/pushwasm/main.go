// Command pushwasm pushes a Wasm module to an OCI registry in one of the
// image layouts wasm-csi accepts, and prints the manifest digest and the
// module's sha256 (the value of the volume's sha256 attribute). It stands in
// for the oras CLI in `make demo`.
//
//	pushwasm [-plain-http] [-layout cncf|wasm-to-oci|solo|solo-config|docker|oci|...] [-user u:p] FILE REF
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "pushwasm: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("pushwasm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	plainHTTP := fs.Bool("plain-http", false, "talk plain HTTP to the registry (default: HTTPS)")
	layoutName := fs.String("layout", "cncf", "image layout: cncf, wasm-to-oci, solo, solo-config, docker (docker-gzip), docker-tar, docker-zstd, oci (oci-gzip), oci-tar, oci-zstd")
	user := fs.String("user", "", "registry credentials as USER:PASSWORD")
	fileName := fs.String("file-name", registrytest.DefaultFileName, "name of the module inside the image")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: pushwasm [-plain-http] [-layout LAYOUT] [-user USER:PASSWORD] FILE REF\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		fs.Usage()
		return errors.New("want exactly two arguments: FILE REF")
	}
	file, ref := fs.Arg(0), fs.Arg(1)
	layout, err := registrytest.ParseLayout(*layoutName)
	if err != nil {
		return err
	}
	opts := []registrytest.PushOption{
		registrytest.WithPlainHTTP(*plainHTTP),
		registrytest.WithFileName(*fileName),
	}
	if *user != "" {
		name, password, ok := strings.Cut(*user, ":")
		if !ok {
			return errors.New("-user must be USER:PASSWORD")
		}
		opts = append(opts, registrytest.WithBasicAuth(name, password))
	}

	sum, err := fileSHA256(file)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	desc, err := registrytest.PushWasmFile(ctx, ref, file, layout, opts...)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "manifest-digest: %s\nmodule-sha256: %s\n", desc.Digest, sum)
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("opening module: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("reading module %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
