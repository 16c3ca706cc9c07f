// Command wasm-csi-driver is the wasm-csi CSI node plugin: it pulls Wasm
// modules packaged as OCI images once per node and bind-mounts them
// read-only into pods through inline ephemeral CSI volumes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	// Mozilla's root certificates, used only when the host gives none: the
	// image is FROM scratch, and registries are HTTPS.
	_ "golang.org/x/crypto/x509roots/fallback"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/klog/v2"

	"github.com/wasm-csi/wasm-csi/csi"
	"github.com/wasm-csi/wasm-csi/node"
	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/kube"
	"github.com/wasm-csi/wasm-csi/node/metrics"
	"github.com/wasm-csi/wasm-csi/node/mount"
	"github.com/wasm-csi/wasm-csi/node/progress"
	"github.com/wasm-csi/wasm-csi/node/pullslots"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/credprovider"
	"github.com/wasm-csi/wasm-csi/puller/hostsconf"
)

// defaultGCPercent is the daemon's GOGC unless the environment sets one
// (an empty GOGC is unset):
// the heap may grow by half over what is live before a collection, instead
// of Go's default doubling. Memory, not CPU, is what a node daemon runs out
// of: a burst of 1,000 pulls peaked ~13 MiB lower and left ~1.7 MiB less a
// minute after, for no CPU the burst benchmark could measure (README,
// "Bursts").
const defaultGCPercent = 50

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Config is everything the flags say.
type Config struct {
	Endpoint           string
	NodeID             string
	DriverName         string
	RootDir            string
	ConfigFile         string
	Kubeconfig         string
	InsecureRegistries []string
	DockerConfig       string
	// CredentialProviderConfig and CredentialProviderBinDir are kubelet's
	// --image-credential-provider-config and -bin-dir.
	CredentialProviderConfig string
	CredentialProviderBinDir string
	MetricsAddress           string
	LogLevel                 string
	LogFormat                string
	// RegistrationDir is where the kubelet plugin-registration socket is
	// served (kubelet's plugins_registry as the container sees it); empty
	// leaves registration to a node-driver-registrar sidecar.
	RegistrationDir string
	// KubeletCSIEndpoint is the CSI socket's path on the host, as kubelet
	// must dial it.
	KubeletCSIEndpoint string
	// PullProgressSize and PullProgressInterval: a download of at least
	// PullProgressSize bytes sends progress events, the first after
	// PullProgressInterval (0: none).
	PullProgressSize     int64
	PullProgressInterval time.Duration
	// CheckFlags parses the flags, reports, and exits.
	CheckFlags bool
}

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// parseFlags reads the command line into a Config.
func parseFlags(args []string, stderr io.Writer) (Config, error) {
	var c Config
	fs := flag.NewFlagSet("wasm-csi-driver", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.Endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint, unix:///path/to/socket")
	fs.StringVar(&c.NodeID, "node-id", "", "this node's name (required; usually $NODE_NAME)")
	fs.StringVar(&c.DriverName, "driver-name", csi.DefaultDriverName, "CSI driver name")
	fs.StringVar(&c.RootDir, "root-dir", "/var/lib/wasm-csi", "host directory of the module store and volume records")
	fs.StringVar(&c.ConfigFile, "config", "", "YAML config file, re-read when it changes")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig for running outside the cluster")
	fs.Var((*stringList)(&c.InsecureRegistries), "insecure-registry", "HOST[:PORT] reached over plain HTTP (repeatable)")
	fs.StringVar(&c.DockerConfig, "docker-config", "", "Docker config.json with node-level registry credentials")
	fs.StringVar(&c.CredentialProviderConfig, "image-credential-provider-config", "", "kubelet's CredentialProviderConfig file (or directory): node credentials from credential provider plugins")
	fs.StringVar(&c.CredentialProviderBinDir, "image-credential-provider-bin-dir", "", "directory of the credential provider plugins' executables")
	fs.StringVar(&c.MetricsAddress, "metrics-address", ":9809", "address of the metrics and health endpoint")
	fs.StringVar(&c.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", "json", "json or text")
	fs.StringVar(&c.RegistrationDir, "kubelet-registration-path", "", "directory (kubelet's plugins_registry) where the driver serves kubelet's plugin-registration API; empty when a node-driver-registrar sidecar registers it")
	fs.StringVar(&c.KubeletCSIEndpoint, "kubelet-csi-endpoint", "", "the CSI socket's path on the host, as kubelet dials it (required with --kubelet-registration-path)")
	progressSize := fs.String("pull-progress-size", resource.NewQuantity(progress.DefaultMinSize, resource.BinarySI).String(),
		"a module download of at least this many bytes (a quantity: 16Mi) sends Pulling events with its progress")
	fs.DurationVar(&c.PullProgressInterval, "pull-progress-interval", progress.DefaultInterval,
		"wait before the first progress event of a download and between the next two; later waits double, up to 5m (0: no progress events)")
	fs.BoolVar(&c.CheckFlags, "check-flags", false, "parse the flags, print them, and exit")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if c.NodeID == "" {
		return Config{}, errors.New("--node-id is required")
	}
	q, err := resource.ParseQuantity(*progressSize)
	if err != nil || q.Sign() < 0 {
		return Config{}, fmt.Errorf("--pull-progress-size %q is not a size such as 16Mi", *progressSize)
	}
	c.PullProgressSize = q.Value()
	if c.PullProgressInterval < 0 {
		return Config{}, errors.New("--pull-progress-interval is negative")
	}
	if _, err := csi.ParseEndpoint(c.Endpoint); err != nil {
		return Config{}, err
	}
	if c.RegistrationDir != "" && c.KubeletCSIEndpoint == "" {
		return Config{}, errors.New("--kubelet-registration-path needs --kubelet-csi-endpoint")
	}
	if (c.CredentialProviderConfig == "") != (c.CredentialProviderBinDir == "") {
		return Config{}, errors.New("--image-credential-provider-config and --image-credential-provider-bin-dir go together")
	}
	for _, r := range c.InsecureRegistries {
		if r == "" || strings.Contains(r, "/") {
			return Config{}, fmt.Errorf("--insecure-registry %q is not HOST or HOST:PORT", r)
		}
	}
	return c, nil
}

func newLogger(c Config, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.LogFormat {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q is not json or text", c.LogFormat)
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "inspect" {
		ic, err := parseInspectFlags(os.Args[2:], os.Stderr)
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		if err == nil {
			err = runInspect(ic, os.Stdout, os.Stderr)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "wasm-csi-driver inspect:", err)
			os.Exit(1)
		}
		return
	}
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "wasm-csi-driver:", err)
		os.Exit(2)
	}
	if cfg.CheckFlags {
		fmt.Printf("flags OK: %+v\n", cfg)
		os.Exit(0)
	}
	log, err := newLogger(cfg, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wasm-csi-driver:", err)
		os.Exit(2)
	}
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		log.Error("exiting", "err", err)
		os.Exit(1)
	}
}

// run wires the parts together and serves until ctx ends.
func run(ctx context.Context, cfg Config, log *slog.Logger) error {
	log.Info("starting", "version", version, "driver", cfg.DriverName, "node", cfg.NodeID, "root", cfg.RootDir, "endpoint", cfg.Endpoint)
	klog.SetSlogLogger(log) // client-go logs through the same handler
	var creds node.Credentials
	var events node.Events
	kcfg, inCluster, err := kube.ClientConfig(cfg.Kubeconfig)
	switch {
	case err != nil:
		return fmt.Errorf("kubernetes client config: %w", err)
	case !inCluster:
		log.Info("no Kubernetes API: running with node credentials only (no pull secrets, no pod events)")
	default:
		kcfg.UserAgent = "wasm-csi/" + version
		client, err := kube.NewCoreClient(kcfg)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		creds = &kube.Credentials{Client: client, Log: log}
		ke := kube.NewEvents(client, cfg.DriverName, cfg.NodeID)
		defer ke.Shutdown()
		events = ke
		log.Info("using the Kubernetes API for pull secrets and pod events", "host", kcfg.Host)
	}
	st, err := store.Open(cfg.RootDir)
	if err != nil {
		return err
	}
	if v, found := st.Format(); found != v {
		log.Info("store migrated", "root", cfg.RootDir, "fromFormat", found, "toFormat", v)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	met, err := metrics.New(reg, st)
	if err != nil {
		return err
	}
	var provider puller.CredentialProvider
	if cfg.CredentialProviderConfig != "" {
		ps, err := credprovider.Load(credprovider.Options{Config: cfg.CredentialProviderConfig, BinDir: cfg.CredentialProviderBinDir, Log: log, Metrics: reg})
		if err != nil {
			return err
		}
		provider = ps
		log.Info("using credential provider plugins for node credentials", "plugins", ps.Names(), "binDir", cfg.CredentialProviderBinDir)
	}
	slots := pullslots.New(pullslots.DefaultLimit)
	reg.MustRegister(slots.Collector())
	runtimeMetrics, err := hostsconf.NewMetrics(reg)
	if err != nil {
		return err
	}
	svc, err := node.NewService(node.Config{
		Puller: puller.Config{
			InsecureRegistries: cfg.InsecureRegistries,
			DockerConfig:       cfg.DockerConfig,
			CredentialProvider: provider,
			UserAgent:          "wasm-csi/" + version,
			Buffers:            puller.NewBuffers(puller.BufferSize, puller.DefaultBufferBudget),
		},
		Metrics:              met,
		RuntimeConfigMetrics: runtimeMetrics,
		Credentials:          creds,
		Events:               events,
		PullSlots:            slots,
		Progress:             progress.Policy{MinSize: cfg.PullProgressSize, Interval: cfg.PullProgressInterval},
	}, st, mount.New(), log)
	if err != nil {
		return err
	}
	if cfg.ConfigFile != "" {
		w := &config.Watcher{Path: cfg.ConfigFile, Log: log, Apply: svc.ApplyConfigFile, Refused: svc.ConfigRefused}
		// A refused file is logged by Load and reported to the service,
		// which then serves nothing until a good file is applied.
		_ = w.Load()
		go func() {
			if err := w.Run(ctx); err != nil {
				log.Error("config watch stopped", "path", cfg.ConfigFile, "err", err)
			}
		}()
	}
	svc.Start(ctx)

	sock, _ := csi.ParseEndpoint(cfg.Endpoint)
	srv, err := csi.Listen(sock,
		&csi.IdentityServer{Name: cfg.DriverName, Version: version},
		&csi.NodeServer{NodeID: cfg.NodeID, Publisher: svc}, log)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", cfg.Endpoint, err)
	}
	errc := make(chan error, 3)
	go func() { errc <- srv.Serve() }()
	checks := []func(context.Context) error{srv.Check, st.Check, svc.CheckConfig}
	if cfg.RegistrationDir != "" {
		rs, err := csi.ListenRegistration(filepath.Join(cfg.RegistrationDir, csi.RegistrationSocketName(cfg.DriverName)),
			cfg.DriverName, cfg.KubeletCSIEndpoint, log)
		if err != nil {
			return fmt.Errorf("serving kubelet plugin registration: %w", err)
		}
		defer rs.Stop()
		go func() { errc <- rs.Serve() }()
		checks = append(checks, rs.Check)
		if err := reg.Register(rs.Collector()); err != nil {
			return err
		}
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.Handle("/healthz", csi.HealthHandler(checks...))
	addDebugHandlers(mux)
	hs := &http.Server{Addr: cfg.MetricsAddress, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	lis, err := net.Listen("tcp", cfg.MetricsAddress)
	if err != nil {
		return fmt.Errorf("--metrics-address: %w", err)
	}
	go func() { errc <- hs.Serve(lis) }()
	log.Info("serving", "endpoint", cfg.Endpoint, "metrics", lis.Addr().String())
	select {
	case <-ctx.Done():
		log.Info("stopping")
		_ = hs.Close()
		srv.Stop()
		return nil
	case err := <-errc:
		return err
	}
}
