package credprovider

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/kubelet/pkg/apis/credentialprovider"
	"k8s.io/kubelet/pkg/apis/credentialprovider/install"
)

// codecs encode requests in the plugin's apiVersion and decode its answer,
// whatever the version (v1alpha1, v1beta1, v1), into the API's internal type,
// as kubelet does. Strict: a response with
// unknown or duplicate fields is refused, as kubelet refuses it.
type codecs struct {
	factory serializer.CodecFactory
	json    runtime.Serializer
}

func newCodecs() (*codecs, error) {
	scheme := runtime.NewScheme()
	install.Install(scheme)
	f := serializer.NewCodecFactory(scheme, serializer.EnableStrict)
	info, ok := runtime.SerializerInfoForMediaType(f.SupportedMediaTypes(), runtime.ContentTypeJSON)
	if !ok {
		return nil, errors.New("no JSON serializer for the credential provider API")
	}
	return &codecs{factory: f, json: info.Serializer}, nil
}

// limitedBuffer keeps at most max bytes; a write past that fails, which
// closes the pipe to the plugin: a plugin that prints without end is cut off,
// not buffered.
type limitedBuffer struct {
	buf  bytes.Buffer
	max  int
	over bool
}

var (
	errOutputTooLarge = errors.New("output too large")
	errTimeout        = errors.New("it did not answer")
)

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if b.buf.Len()+len(p) > b.max {
		b.over = true
		return 0, errOutputTooLarge
	}
	return b.buf.Write(p)
}

// tailBuffer keeps the last max bytes written: a plugin's stderr, for the
// log, however much it writes.
type tailBuffer struct {
	buf []byte
	max int
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if len(p) > b.max {
		p = p[len(p)-b.max:]
	}
	b.buf = append(b.buf, p...)
	if len(b.buf) > b.max {
		b.buf = append(b.buf[:0], b.buf[len(b.buf)-b.max:]...)
	}
	return n, nil
}

// run executes one plugin for image and returns its answer. The
// error never holds what the plugin printed on stdout; stderr's tail is
// returned apart, for the log only.
func (p *plugin) run(ctx context.Context, image string) (*credentialprovider.CredentialProviderResponse, []byte, error) {
	req, err := runtime.Encode(p.codecs.factory.EncoderForVersion(p.codecs.json, p.gv),
		&credentialprovider.CredentialProviderRequest{Image: image})
	if err != nil {
		return nil, nil, fmt.Errorf("encoding the request: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	stdout := &limitedBuffer{max: p.maxOutput}
	stderr := &tailBuffer{max: stderrTail}
	cmd := exec.CommandContext(ctx, p.bin, p.args...)
	cmd.Stdin = bytes.NewReader(req)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	// The plugin's environment is the driver's, then the config's env (a
	// later entry wins), as kubelet gives it.
	cmd.Env = append(os.Environ(), p.env...)
	// Its own process group, killed whole at the timeout: a shell script's
	// children must not keep the pipes (and this pull) open.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	err = cmd.Run()
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return nil, stderr.buf, fmt.Errorf("%w within %s and was killed", errTimeout, p.timeout)
	case ctx.Err() != nil:
		return nil, stderr.buf, ctx.Err()
	case stdout.over:
		return nil, stderr.buf, fmt.Errorf("it printed more than %d bytes on stdout", p.maxOutput)
	case err != nil:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil, stderr.buf, fmt.Errorf("it failed (%s)", ee.ProcessState)
		}
		return nil, stderr.buf, fmt.Errorf("it could not be run: %w", err)
	}
	resp, err := p.decode(stdout.buf.Bytes())
	return resp, stderr.buf, err
}

// decode checks and decodes a plugin's stdout. Its errors say what is wrong
// with the answer, never what the answer holds.
func (p *plugin) decode(data []byte) (*credentialprovider.CredentialProviderResponse, error) {
	var tm struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := json.Unmarshal(data, &tm); err != nil {
		return nil, errors.New("its stdout is not a JSON object")
	}
	if tm.APIVersion != p.apiVersion || tm.Kind != "CredentialProviderResponse" {
		// Only a known version is quoted: whatever else is there may be
		// anything the plugin printed.
		got := "another apiVersion or kind"
		if pluginVersions[tm.APIVersion] {
			got = "apiVersion " + tm.APIVersion
		}
		return nil, fmt.Errorf("its answer is not a CredentialProviderResponse of apiVersion %s as configured (it has %s)", p.apiVersion, got)
	}
	obj, _, err := p.codecs.factory.UniversalDecoder().Decode(data, nil, nil)
	if err != nil {
		// Not wrapped: a decoding error may quote the credentials.
		return nil, errors.New("its CredentialProviderResponse does not decode (unknown, duplicate or mistyped fields)")
	}
	resp, ok := obj.(*credentialprovider.CredentialProviderResponse)
	if !ok {
		return nil, fmt.Errorf("its answer decodes to %T, not a CredentialProviderResponse", obj)
	}
	switch resp.CacheKeyType {
	case credentialprovider.ImagePluginCacheKeyType, credentialprovider.RegistryPluginCacheKeyType, credentialprovider.GlobalPluginCacheKeyType:
	default:
		return nil, errors.New("its cacheKeyType is not Image, Registry or Global")
	}
	return resp, nil
}
