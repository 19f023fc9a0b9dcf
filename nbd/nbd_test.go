package nbd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/nbd"
)

// chainExport serves a disk chain (the reference the tests compare qemu-nbd with).
type chainExport struct{ img disk.Image }

func (c chainExport) Size() int64                             { return c.img.Size() }
func (c chainExport) ReadAt(p []byte, off int64) (int, error) { return c.img.ReadAt(p, off) }
func (c chainExport) Extents(off, n int64) ([]nbd.Extent, error) {
	exts, err := disk.MapChain(c.img, off, n)
	if err != nil {
		return nil, err
	}
	out := make([]nbd.Extent, 0, len(exts))
	for _, e := range exts {
		out = append(out, nbd.Extent{Len: e.Len, Hole: e.Zero, Zero: e.Zero})
	}
	return out, nil
}

// serve serves exports on a unix socket until the test ends.
func serve(t *testing.T, exports map[string]nbd.Export) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &nbd.Server{
		Lookup: func(name string) (nbd.Export, bool) { e, ok := exports[name]; return e, ok },
		Names: func() []string {
			var n []string
			for k := range exports {
				n = append(n, k)
			}
			return n
		},
		HandshakeTimeout: 2 * time.Second,
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, nbd.ErrClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock
}

// testChain makes a three-layer chain with data, zero clusters, discarded
// ranges and a partial last cluster, written by qemu-io.
func testChain(t *testing.T) string {
	t.Helper()
	testutil.NeedQemu(t)
	dir := t.TempDir()
	base, mid, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	testutil.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 4M", "-c", "write -P 0x11 20M 1M", "-c", "write -P 0x7 63M 1M", base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
	testutil.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -z 1M 512k", "-c", "write -P 0x22 8M 192k", mid)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
	testutil.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 64k", "-c", "discard 20M 256k", "-c", "write -P 0x44 40M 3M", top)
	return top
}

func openChain(t *testing.T, path string) disk.Image {
	t.Helper()
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func uri(sock, export string) string { return "nbd+unix:///" + export + "?socket=" + sock }

// TestAgainstQemuNBD serves a chain through this server and through qemu-nbd:
// qemu-img compare says identical, qemu-img map gives the same extents, and
// qemu-io reads patterns, sees a read-only export and refuses writes.
func TestAgainstQemuNBD(t *testing.T) {
	testutil.NeedTool(t, "qemu", "qemu-nbd")
	top := testChain(t)
	sock := serve(t, map[string]nbd.Export{"system": chainExport{openChain(t, top)}})

	ref := filepath.Join(t.TempDir(), "qemu-nbd.sock")
	qn := exec.Command("qemu-nbd", "--socket="+ref, "--format=qcow2", "--read-only", "--persistent", "--export-name=system", top)
	if err := qn.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qn.Process.Kill(); qn.Wait() })
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("unix", ref); err == nil {
			c.Close()
			break
		}
		time.Sleep(20 * time.Millisecond)
	}

	out := testutil.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri(sock, "system"), top)
	if !strings.Contains(out, "identical") {
		t.Fatalf("compare: %s", out)
	}
	testutil.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock, "system"), uri(ref, "system"))

	ours := testutil.Run(t, "qemu-img", "map", "--output=json", "-f", "raw", uri(sock, "system"))
	theirs := testutil.Run(t, "qemu-img", "map", "--output=json", "-f", "raw", uri(ref, "system"))
	if normMap(t, ours) != normMap(t, theirs) {
		t.Fatalf("qemu-img map differs:\nours:   %s\nqemu-nbd: %s", ours, theirs)
	}
	if !strings.Contains(ours, `"data": false`) {
		t.Fatalf("the map shows no hole: %s", ours)
	}

	for _, c := range []string{"read -P 0xab 0 1M", "read -P 0 1M 512k", "read -P 0x33 2M 64k", "read -P 0x22 8M 192k", "read -P 0 20M 256k", "read -P 0x11 20736k 768k", "read -P 0x7 63M 1M"} {
		testutil.Run(t, "qemu-io", "-r", "-f", "raw", "-c", c, uri(sock, "system"))
	}
	// A writable open of a read-only export fails; so does a write forced through.
	if out, err := testutil.RunErr("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri(sock, "system")); err == nil && !strings.Contains(out, "read-only") && !strings.Contains(out, "not permitted") {
		t.Fatalf("a write to the export was not refused: %s", out)
	}
	info := testutil.Run(t, "qemu-img", "info", "--output=json", uri(sock, "system"))
	if !strings.Contains(info, `"virtual-size": 67108864`) {
		t.Fatalf("info: %s", info)
	}
}

// normMap keeps each extent's start, length, data and zero.
func normMap(t *testing.T, s string) string {
	t.Helper()
	var exts []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(s), &exts); err != nil {
		t.Fatalf("map json: %v\n%s", err, s)
	}
	var b strings.Builder
	for _, e := range exts {
		b.WriteString(strings.Join([]string{itoa(e.Start), itoa(e.Length), btoa(e.Data), btoa(e.Zero)}, ",") + ";")
	}
	return b.String()
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
func btoa(b bool) string {
	if b {
		return "t"
	}
	return "f"
}

// rawClient speaks the protocol by hand, for what qemu's tools never send.
type rawClient struct {
	t *testing.T
	c net.Conn
}

func dialRaw(t *testing.T, sock string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	rc := &rawClient{t: t, c: c}
	var hello [18]byte
	rc.read(hello[:])
	if string(hello[:8]) != "NBDMAGIC" || string(hello[8:16]) != "IHAVEOPT" {
		t.Fatalf("greeting %q", hello)
	}
	rc.write(binary.BigEndian.AppendUint32(nil, 3))
	return rc
}

func (rc *rawClient) read(b []byte) {
	rc.t.Helper()
	if _, err := io.ReadFull(rc.c, b); err != nil {
		rc.t.Fatalf("read: %v", err)
	}
}

func (rc *rawClient) write(b []byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(b); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

func (rc *rawClient) option(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, 0x49484156454f5054)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	rc.write(append(b, data...))
}

// reply reads one option reply: its type and data.
func (rc *rawClient) reply() (uint32, []byte) {
	var h [20]byte
	rc.read(h[:])
	data := make([]byte, binary.BigEndian.Uint32(h[16:]))
	rc.read(data)
	return binary.BigEndian.Uint32(h[12:]), data
}

// goExport selects export name with NBD_OPT_GO and reads the replies to the ack.
func (rc *rawClient) goExport(name string) (size uint64) {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, 0)
	rc.option(7, b)
	for {
		typ, data := rc.reply()
		switch typ {
		case 1:
			return size
		case 3:
			if binary.BigEndian.Uint16(data) == 0 {
				size = binary.BigEndian.Uint64(data[2:])
			}
		default:
			rc.t.Fatalf("go: reply %#x %q", typ, data)
		}
	}
}

func (rc *rawClient) request(typ uint16, cookie, off uint64, n uint32, payload []byte) {
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, n)
	rc.write(append(b, payload...))
}

// simpleReply reads a simple reply's error and cookie (and n bytes of data
// when it succeeded).
func (rc *rawClient) simpleReply(n int) (errno uint32, cookie uint64, data []byte) {
	var h [16]byte
	rc.read(h[:])
	if binary.BigEndian.Uint32(h[:]) != 0x67446698 {
		rc.t.Fatalf("simple reply magic %x", h[:4])
	}
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && n > 0 {
		data = make([]byte, n)
		rc.read(data)
	}
	return errno, cookie, data
}

// TestProtocolEdges: what qemu's tools never send gets the protocol's answer.
func TestProtocolEdges(t *testing.T) {
	data := bytes.Repeat([]byte{0x5a}, 1<<20)
	sock := serve(t, map[string]nbd.Export{"": memExport(data)})

	cases := []struct {
		name string
		run  func(t *testing.T, rc *rawClient)
	}{
		{"unknown export", func(t *testing.T, rc *rawClient) {
			b := binary.BigEndian.AppendUint32(nil, 4)
			b = append(b, "nope"...)
			rc.option(7, binary.BigEndian.AppendUint16(b, 0))
			if typ, msg := rc.reply(); typ != 1<<31+6 {
				t.Fatalf("reply %#x %q, want NBD_REP_ERR_UNKNOWN", typ, msg)
			}
		}},
		{"unknown option", func(t *testing.T, rc *rawClient) {
			rc.option(99, nil)
			if typ, _ := rc.reply(); typ != 1<<31+1 {
				t.Fatalf("reply %#x, want NBD_REP_ERR_UNSUP", typ)
			}
		}},
		{"oversized option", func(t *testing.T, rc *rawClient) {
			rc.option(7, make([]byte, 64<<10))
			if typ, _ := rc.reply(); typ != 1<<31+9 {
				t.Fatalf("reply %#x, want NBD_REP_ERR_TOO_BIG", typ)
			}
		}},
		{"meta context without structured replies", func(t *testing.T, rc *rawClient) {
			rc.option(10, make([]byte, 8))
			if typ, _ := rc.reply(); typ != 1<<31+3 {
				t.Fatalf("reply %#x, want NBD_REP_ERR_INVALID", typ)
			}
		}},
		{"list", func(t *testing.T, rc *rawClient) {
			rc.option(3, nil)
			if typ, data := rc.reply(); typ != 2 || binary.BigEndian.Uint32(data) != 0 {
				t.Fatalf("reply %#x %q, want the default export", typ, data)
			}
			if typ, _ := rc.reply(); typ != 1 {
				t.Fatalf("reply %#x, want ack", typ)
			}
		}},
		{"simple replies: read, beyond the end, write, trim, unknown command", func(t *testing.T, rc *rawClient) {
			if size := rc.goExport(""); size != 1<<20 {
				t.Fatalf("size %d", size)
			}
			rc.request(0, 7, 4096, 512, nil)
			if e, ck, d := rc.simpleReply(512); e != 0 || ck != 7 || !bytes.Equal(d, data[:512]) {
				t.Fatalf("read: errno %d cookie %d", e, ck)
			}
			rc.request(0, 8, 1<<20-256, 512, nil)
			if e, _, _ := rc.simpleReply(0); e != 22 {
				t.Fatalf("read beyond the end: errno %d, want EINVAL", e)
			}
			rc.request(1, 9, 0, 4096, make([]byte, 4096))
			if e, _, _ := rc.simpleReply(0); e != 1 {
				t.Fatalf("write: errno %d, want EPERM", e)
			}
			rc.request(4, 10, 0, 4096, nil)
			if e, _, _ := rc.simpleReply(0); e != 1 {
				t.Fatalf("trim: errno %d, want EPERM", e)
			}
			rc.request(77, 11, 0, 0, nil)
			if e, _, _ := rc.simpleReply(0); e != 22 {
				t.Fatalf("unknown command: errno %d, want EINVAL", e)
			}
			rc.request(3, 12, 0, 0, nil)
			if e, _, _ := rc.simpleReply(0); e != 0 {
				t.Fatalf("flush: errno %d", e)
			}
			rc.request(2, 13, 0, 0, nil)
		}},
		{"bad request magic ends the connection", func(t *testing.T, rc *rawClient) {
			rc.goExport("")
			rc.write(make([]byte, 28))
			if _, err := rc.c.Read(make([]byte, 1)); err == nil {
				t.Fatal("the connection stayed open")
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, dialRaw(t, sock)) })
	}

	t.Run("a silent client is dropped after the handshake timeout", func(t *testing.T) {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if _, err := c.Read(make([]byte, 1)); err == nil || time.Since(start) > 8*time.Second {
			t.Fatalf("read after silence: %v after %v", err, time.Since(start))
		}
	})
}

// memExport is an export of bytes in memory, all data.
type memExport []byte

func (m memExport) Size() int64 { return int64(len(m)) }
func (m memExport) ReadAt(p []byte, off int64) (int, error) {
	return copy(p, m[off:]), nil
}
func (m memExport) Extents(off, n int64) ([]nbd.Extent, error) {
	return []nbd.Extent{{Len: n}}, nil
}

// failExport fails every read: the client sees EIO, not a hang.
type failExport struct{ memExport }

func (failExport) ReadAt(p []byte, off int64) (int, error) {
	return 0, errors.New("cluster 3 is not here and the server does not answer")
}

func TestReadErrorReachesQemu(t *testing.T) {
	testutil.NeedQemu(t)
	sock := serve(t, map[string]nbd.Export{"x": failExport{memExport(make([]byte, 1<<20))}})
	out, err := testutil.RunErr("qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", uri(sock, "x"))
	if err == nil && !strings.Contains(out, "Input/output error") {
		t.Fatalf("qemu-io read of a failing export: %v %s", err, out)
	}
	if !strings.Contains(out, "Input/output error") {
		t.Fatalf("qemu-io: %s", out)
	}
}
