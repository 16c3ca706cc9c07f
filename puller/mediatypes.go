package puller

// Media types of the image layouts the contract accepts.
const (
	// CNCF TAG Runtime Wasm OCI artifact (oras push, wkg).
	MediaTypeWasmConfigV0 = "application/vnd.wasm.config.v0+json"
	MediaTypeWasmLayer    = "application/wasm"

	// wasm-to-oci (older) layout.
	MediaTypeWasmToOCIConfig = "application/vnd.wasm.config.v1+json"
	MediaTypeWasmToOCILayer  = "application/vnd.wasm.content.layer.v1+wasm"

	// solo.io layouts, Istio's "oci" variant.
	MediaTypeSoloLayer  = "application/vnd.module.wasm.content.layer.v1+wasm"
	MediaTypeSoloConfig = "application/vnd.module.wasm.config.v1+json"

	// Container images, Istio's "compat" variant.
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	MediaTypeDockerConfig       = "application/vnd.docker.container.image.v1+json"
	MediaTypeDockerLayerGzip    = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	MediaTypeDockerLayerTar     = "application/vnd.docker.image.rootfs.diff.tar"
	MediaTypeDockerLayerZstd    = "application/vnd.docker.image.rootfs.diff.tar.zstd"
	MediaTypeOCIManifest        = "application/vnd.oci.image.manifest.v1+json"
	MediaTypeOCIIndex           = "application/vnd.oci.image.index.v1+json"
	MediaTypeOCIConfig          = "application/vnd.oci.image.config.v1+json"
	MediaTypeOCILayerTar        = "application/vnd.oci.image.layer.v1.tar"
	MediaTypeOCILayerGzip       = "application/vnd.oci.image.layer.v1.tar+gzip"
	MediaTypeOCILayerZstd       = "application/vnd.oci.image.layer.v1.tar+zstd"
)
