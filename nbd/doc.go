// Package nbd is a read-only NBD server (the Network Block Device protocol's
// transmission phase over the fixed newstyle handshake), as far as QEMU uses it:
// NBD_OPT_GO and NBD_OPT_INFO with export information and block sizes,
// NBD_OPT_EXPORT_NAME for old clients, NBD_OPT_LIST, structured replies,
// the base:allocation meta context (block status, so that holes stay holes in
// `qemu-img map` and in QEMU's copy-on-read), flush, and a clear EPERM for
// every write, trim or write-zeroes.
//
// An export is anything with a size, a ReaderAt and an extent map (Export).
// Requests of one connection run concurrently up to a bound and replies are
// written whole under one lock, as the protocol allows (cookies pair them).
//
// A hostile client meets bounds everywhere: the handshake has a deadline,
// option payloads and request lengths are capped, block status answers at
// most a fixed number of extents, and a malformed request ends the
// connection. It imports nothing else from cvd.
package nbd
