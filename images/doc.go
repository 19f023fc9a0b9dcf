// Package images is the store: sealed layers with content IDs, the desktop catalog,
// versions, devices, leases, the cluster-digest index used for dedup, and garbage
// collection that never removes a layer something still depends on.
package images
