package csi

// DefaultDriverName is the CSI driver name pods write in their volumes
// (`driver: wasm.csi.dev`) and the CSIDriver object's name.
const DefaultDriverName = "wasm.csi.dev"
