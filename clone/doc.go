// Package clone makes linked clones of a desktop or a layer: writable tops on a sealed
// chain, one or thousands at a time, each with its own machine identity (UUID, MAC,
// hostname) and cloud-init NoCloud seed image. Identities are never synced.
package clone
