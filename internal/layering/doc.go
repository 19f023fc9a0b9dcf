// Package layering holds no code: its test checks that the packages import one
// another only downward, as docs/ARCHITECTURE.md draws them.
package layering
