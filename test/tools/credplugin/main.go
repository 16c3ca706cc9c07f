// Command credplugin is a kubelet credential provider plugin for the tests:
// it reads a CredentialProviderRequest on stdin and answers as its flags
// say, a real executable run the way kubelet (and the driver) runs plugins.
//
//	credplugin -mode=ok -user=U -password=P [-key=HOST] [-cache-key-type=Registry] [-cache-duration=5m]
//
// Modes: ok (a CredentialProviderResponse giving -user/-password for -key,
// default the request's registry), fail (exit 3, a message on stderr), hang
// (sleep forever, in a child process too), garbage (not JSON), flood
// (print without end), wrong-version (a response of another apiVersion),
// bad-cache-key (an unknown cacheKeyType), unknown-field (a response with a
// field the API does not have). -log=FILE appends "apiVersion image\n" per
// run; -delay sleeps before answering; -child-pid-file receives the pid of
// hang's child. -require-env=NAME=VALUE fails unless
// the environment has it.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"
)

func main() {
	mode := flag.String("mode", "ok", "ok, fail, hang, garbage, flood, wrong-version, bad-cache-key, unknown-field")
	user := flag.String("user", "", "user name to answer")
	password := flag.String("password", "", "password to answer")
	key := flag.String("key", "", "the auth key to answer for (default: the request's registry)")
	cacheKeyType := flag.String("cache-key-type", "Image", "Image, Registry or Global")
	cacheDuration := flag.String("cache-duration", "", "cacheDuration to answer (empty: none, the config's default applies)")
	logFile := flag.String("log", "", "append one line per run to this file")
	delay := flag.Duration("delay", 0, "wait this long before answering")
	pidFile := flag.String("child-pid-file", "", "hang: write the child's pid here")
	requireEnv := flag.String("require-env", "", "NAME=VALUE the environment must hold")
	flag.Parse()

	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading stdin: %v", err)
	}
	var req struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Image      string `json:"image"`
	}
	if err := json.Unmarshal(in, &req); err != nil || req.Kind != "CredentialProviderRequest" || req.Image == "" {
		fail("stdin is not a CredentialProviderRequest: %q", in)
	}
	if *logFile != "" {
		f, err := os.OpenFile(*logFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			fail("log: %v", err)
		}
		fmt.Fprintf(f, "%s %s\n", req.APIVersion, req.Image)
		f.Close()
	}
	if *requireEnv != "" {
		name, value, _ := strings.Cut(*requireEnv, "=")
		if os.Getenv(name) != value {
			fail("environment variable %s is %q, want %q", name, os.Getenv(name), value)
		}
	}
	time.Sleep(*delay)

	resp := map[string]any{
		"apiVersion":   req.APIVersion,
		"kind":         "CredentialProviderResponse",
		"cacheKeyType": *cacheKeyType,
	}
	if *cacheDuration != "" {
		resp["cacheDuration"] = *cacheDuration
	}
	k := *key
	if k == "" {
		k, _, _ = strings.Cut(req.Image, "/")
	}
	resp["auth"] = map[string]any{k: map[string]string{"username": *user, "password": *password}}

	switch *mode {
	case "ok":
	case "fail":
		fmt.Fprintln(os.Stderr, "credplugin: no credentials for you")
		os.Exit(3)
	case "hang":
		// A child holding stdout open too, as a shell script's would.
		cmd := exec.Command("sleep", "3600")
		cmd.Stdout = os.Stdout
		if err := cmd.Start(); err != nil {
			fail("starting the child: %v", err)
		}
		if *pidFile != "" {
			_ = os.WriteFile(*pidFile, []byte(fmt.Sprint(cmd.Process.Pid)), 0o600)
		}
		time.Sleep(time.Hour)
	case "garbage":
		// Garbage that holds the secret: it must not reach any message.
		fmt.Printf("this is not json %s\n", *password)
		return
	case "flood":
		line := strings.Repeat(*password, 64) + "\n"
		for {
			if _, err := os.Stdout.WriteString(line); err != nil {
				os.Exit(1)
			}
		}
	case "wrong-version":
		resp["apiVersion"] = "credentialprovider.kubelet.k8s.io/v1alpha1"
		if req.APIVersion == "credentialprovider.kubelet.k8s.io/v1alpha1" {
			resp["apiVersion"] = "credentialprovider.kubelet.k8s.io/v1"
		}
	case "bad-cache-key":
		resp["cacheKeyType"] = *password
	case "unknown-field":
		resp["token"] = *password
	default:
		fail("unknown -mode %q", *mode)
	}
	if err := json.NewEncoder(os.Stdout).Encode(resp); err != nil {
		fail("writing: %v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "credplugin: "+format+"\n", args...)
	os.Exit(3)
}
