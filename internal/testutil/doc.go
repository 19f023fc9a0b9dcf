// Package testutil holds helpers shared by cvd's tests: required external tools
// (a missing tool skips on a bare laptop and fails under CI), and QEMU oracles
// (qemu-img check/compare on every image a test wrote).
package testutil
