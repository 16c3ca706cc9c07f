// Package fleet is the fleet suite: twenty real daemons as twenty nodes
// (test/lib/fleet) publishing the same module, straight at one upstream
// registry or through a pull-through cache (a hosts.toml mirror or a
// registries.mirrors entry). It proves how often the module's blob crosses
// from the upstream (once through a cache, once per node without one), that
// nodes fall back to the upstream while the cache is down and return to it
// after, and that every pod on every node is served.
//
// Needs: root (real mounts) and distribution's registry (bin/registry, also
// run as the pull-through cache).
package fleet
