// Package verify decides whether an image's signatures satisfy the node's
// verification policy (the config file's `verification` section).
//
// It owns three things:
//   - compiling the policies (keys, Fulcio identities, the Sigstore trusted
//     root, Notary Project certificates and identities) and choosing the
//     first policy whose images match;
//   - collecting an image's signatures from its registry (Collect): cosign's
//     `sha256-<hex>.sig` tag, Sigstore bundles and Notary Project signatures
//     found as OCI referrers (by the referrers API or the referrers tag),
//     under size caps and a bound on how many are read;
//   - checking collected signatures offline (Policy.Check), with sigstore-go
//     for cosign's forms and notation-go for Notary Project signatures.
//
// Collection and checking are apart on purpose: the node keeps the Evidence
// it collected, so a policy changed later is checked against it without
// asking the registry again.
//
// It must not touch the store, the host, events or metrics; which registry
// address may be dialled and how requests are retried belong to the puller's
// transport, which the repository handed to Collect carries.
package verify
