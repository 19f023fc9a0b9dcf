// Package syncd is the sync daemon: the HTTP(S) server on the data-center side and the
// client/agent on the laptop side; check-out, check-in, leases, expiry and the cluster
// transfer protocol.
package syncd
