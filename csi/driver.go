// Package csi is the driver's gRPC transport: the CSI Identity and Node
// servers on a unix socket, kubelet's plugin registration, and the health
// endpoint. It validates each request's volume attributes into a
// node.PublishRequest and maps domain errors to gRPC status codes in one
// function (codeOf in errors.go).
//
// It owns: the CSI protocol and the volume attributes' syntax.
//
// It must not: touch the host or a registry (the node's Service does), or
// return a status code from anywhere but codeOf.
package csi

// DefaultDriverName is the CSI driver name pods write in their volumes
// (`driver: wasm.csi.dev`) and the CSIDriver object's name.
const DefaultDriverName = "wasm.csi.dev"
