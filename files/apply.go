package files

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/diskfs/go-diskfs/filesystem/ext4"

	"github.com/cvd-project/cvd/disk"
)

// Errors of the writer. Test with errors.Is.
var (
	// ErrWriter: a tool the writer runs is missing, or it runs without the
	// privileges a loop mount needs.
	ErrWriter = errors.New("file writer unavailable")
	// ErrFsck: e2fsck found the written file system unclean; nothing of it
	// may be used.
	ErrFsck = errors.New("e2fsck found the written file system unclean")
)

// Kinds of Op.
const (
	OpWrite   = "write"   // a regular file: content from the source, then owner, mode, times
	OpMkdir   = "mkdir"   // a directory (or its owner, mode and times when it exists)
	OpSymlink = "symlink" // a symbolic link to Entry.Target
	OpRemove  = "remove"  // a file, link or empty directory
)

// Op is one change the writer makes to a file system.
type Op struct {
	Kind  string `json:"kind"`
	Path  string `json:"path"`
	Entry *Entry `json:"entry,omitempty"` // what to make (not for remove)
	// From is, for a write, the path of the content in the source file system
	// (Path when empty): a conflicted copy is written under another name.
	From string `json:"from,omitempty"`
}

// Skip is an op the writer did not carry out, and why.
type Skip struct {
	Path string `json:"path"`
	Why  string `json:"why"`
}

// ApplyReport is what Apply did.
type ApplyReport struct {
	Written      int    `json:"written"`
	Made         int    `json:"made"` // directories and links
	Removed      int    `json:"removed"`
	BytesWritten int64  `json:"bytes-written"`
	Skipped      []Skip `json:"skipped,omitempty"`
	Fsck         string `json:"fsck"` // e2fsck's verdict on the result
}

// Source is the file system the written contents come from: the ext4 file
// system at Start (Size bytes) of Img, read in process.
type Source struct {
	Img         disk.Image
	Start, Size int64
}

// Target is the file system written: the ext4 file system at Start (Size
// bytes) of the qcow2 file Path (usually a new, empty top over layers).
// TempDir holds the mount points while Apply runs.
type Target struct {
	Path        string
	Start, Size int64
	TempDir     string
}

// Apply makes ops on the target's file system with the host kernel's ext4
// driver, the one writer that is always correct: qemu-storage-daemon exports
// the target's qcow2 chain as a FUSE file, a loop device maps the file
// system's partition, and the kernel mounts it; each op goes through an
// os.Root on the mount (nothing resolves outside it) and never through a
// symbolic link in a parent directory. After the unmount, `e2fsck -fn` judges
// the result: an unclean file system is ErrFsck. Contents are read from src
// in process and checked against their manifest SHA-256.
//
// The kernel mounts only the target's chain, which is meant to be the layers
// an administrator published under a new top; the source (what a guest
// wrote) is never mounted. Apply needs root (a loop mount), losetup, mount,
// e2fsck and qemu-storage-daemon; without them it fails with ErrWriter before
// touching anything. Ops run in the order given; an op that cannot be made
// (a parent that is not a directory, a directory that is not empty) is
// skipped and reported.
func Apply(ctx context.Context, src Source, dst Target, ops []Op) (rep *ApplyReport, err error) {
	if err := writerReady(); err != nil {
		return nil, err
	}
	var fsys tree
	if needsSource(ops) {
		if fsys, err = openExt4(ctx, newStorage(src.Img), src.Start, src.Size); err != nil {
			return nil, fmt.Errorf("source %s: %w", src.Img.Info().Path, err)
		}
	}
	m, err := mountTarget(ctx, dst)
	if err != nil {
		return nil, err
	}
	defer func() {
		// Undone even when ctx ended: a mount must not be left behind.
		if cerr := m.close(context.WithoutCancel(ctx), err == nil); err == nil && cerr != nil {
			err = cerr
		}
		if err == nil {
			rep.Fsck = m.fsck
		}
	}()
	rep = &ApplyReport{}
	w := &applier{root: m.root, src: fsys, rep: rep}
	err = w.run(ctx, ops)
	return rep, err
}

func needsSource(ops []Op) bool {
	for _, o := range ops {
		if o.Kind == OpWrite {
			return true
		}
	}
	return false
}

// writerReady checks the tools and privileges Apply needs.
func writerReady() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: writing a file system loop-mounts it, which needs root", ErrWriter)
	}
	for _, t := range []string{"qemu-storage-daemon", "losetup", "mount", "umount", "e2fsck"} {
		if _, err := lookTool(t); err != nil {
			return fmt.Errorf("%w: %s not found (Debian: qemu-system-common, mount, e2fsprogs)", ErrWriter, t)
		}
	}
	return nil
}

// lookTool finds a tool in PATH or the sbin directories.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", exec.ErrNotFound
}

// runTool runs a tool and returns its output; a failure carries it.
func runTool(ctx context.Context, name string, args ...string) (string, error) {
	p, err := lookTool(name)
	if err != nil {
		return "", fmt.Errorf("%w: %s not found", ErrWriter, name)
	}
	var out bytes.Buffer
	c := exec.CommandContext(ctx, p, args...)
	c.Stdout, c.Stderr = &out, &out
	err = c.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// openExt4 opens the ext4 file system at start with go-diskfs, after cvd's own
// bounds checks of its superblock and descriptors.
func openExt4(ctx context.Context, st *storage, start, size int64) (fsys *ext4.FileSystem, err error) {
	defer func() {
		if p := recover(); p != nil {
			fsys, err = nil, fmt.Errorf("%w: %v", ErrCorrupt, p)
		}
	}()
	if _, err := readGeometry(ctx, st, start, size); err != nil {
		if errors.Is(err, errNotExt4) {
			return nil, ErrNoFileSystem
		}
		return nil, err
	}
	fsys, err = ext4.Read(st, size, start, 512)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return fsys, nil
}

// mounted is a target mounted read-write.
type mounted struct {
	dir    string // temporary: export file and mount point
	daemon *exec.Cmd
	done   chan error // the daemon's exit
	dev    string     // the loop device
	mnt    string
	root   *os.Root
	fsck   string
}

// mountTarget exports, maps and mounts dst.
func mountTarget(ctx context.Context, dst Target) (m *mounted, err error) {
	dir, err := os.MkdirTemp(dst.TempDir, ".cvd-write-")
	if err != nil {
		return nil, err
	}
	m = &mounted{dir: dir, mnt: filepath.Join(dir, "mnt")}
	defer func() {
		if err != nil {
			m.close(context.WithoutCancel(ctx), false)
		}
	}()
	export := filepath.Join(dir, "export")
	if err := os.WriteFile(export, nil, 0o600); err != nil {
		return m, err
	}
	if err := os.Mkdir(m.mnt, 0o700); err != nil {
		return m, err
	}
	qsd, _ := lookTool("qemu-storage-daemon")
	var stderr bytes.Buffer
	// The export lives as long as the daemon: not bound to ctx, stopped by close.
	m.daemon = exec.Command(qsd,
		"--blockdev", "driver=file,node-name=file,filename="+blockdevValue(dst.Path),
		"--blockdev", "driver=qcow2,node-name=top,file=file",
		"--export", "type=fuse,id=export,node-name=top,mountpoint="+blockdevValue(export)+",writable=on")
	m.daemon.Stdout, m.daemon.Stderr = &stderr, &stderr
	if err := m.daemon.Start(); err != nil {
		return m, fmt.Errorf("%w: qemu-storage-daemon: %v", ErrWriter, err)
	}
	m.done = make(chan error, 1)
	go func() { m.done <- m.daemon.Wait() }()
	// Ready when the export file is a FUSE mount (another device than its directory).
	parent, err := os.Stat(dir)
	if err != nil {
		return m, err
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		fi, err := os.Stat(export)
		if err == nil && fi.Sys().(*syscall.Stat_t).Dev != parent.Sys().(*syscall.Stat_t).Dev {
			break
		}
		select {
		case werr := <-m.done:
			m.done <- werr
			return m, fmt.Errorf("qemu-storage-daemon exited (%v): %s", werr, strings.TrimSpace(stderr.String()))
		case <-ctx.Done():
			return m, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return m, fmt.Errorf("qemu-storage-daemon: the export of %s did not appear: %s", dst.Path, strings.TrimSpace(stderr.String()))
		}
	}
	out, err := runTool(ctx, "losetup", "--find", "--show", "--offset", strconv.FormatInt(dst.Start, 10),
		"--sizelimit", strconv.FormatInt(dst.Size, 10), export)
	if err != nil {
		return m, err
	}
	m.dev = strings.TrimSpace(out)
	if _, err := runTool(ctx, "mount", "-t", "ext4", "-o", "rw,nosuid,nodev,noexec", m.dev, m.mnt); err != nil {
		return m, err
	}
	m.root, err = os.OpenRoot(m.mnt)
	if err != nil {
		return m, err
	}
	return m, nil
}

// blockdevValue escapes a value for QEMU's option syntax (a comma is doubled).
func blockdevValue(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// close unmounts (syncing), runs e2fsck when check is set, detaches the loop
// device and stops the daemon (which flushes the qcow2 file). It undoes as
// much as it can whatever failed.
func (m *mounted) close(ctx context.Context, check bool) error {
	var errs []error
	if m.root != nil {
		m.root.Close()
		m.root = nil
	}
	mountedHere := func() bool {
		b, _ := os.ReadFile("/proc/self/mountinfo")
		return bytes.Contains(b, []byte(" "+m.mnt+" "))
	}
	if m.dev != "" && mountedHere() {
		if _, err := runTool(ctx, "umount", m.mnt); err != nil {
			errs = append(errs, err)
			runTool(ctx, "umount", "-l", m.mnt)
			check = false
		}
	}
	if m.dev != "" {
		if check {
			out, err := runTool(ctx, "e2fsck", "-fn", m.dev)
			m.fsck = lastLine(out)
			if err != nil {
				errs = append(errs, fmt.Errorf("%w: %v", ErrFsck, err))
			}
		}
		if _, err := runTool(ctx, "losetup", "-d", m.dev); err != nil {
			errs = append(errs, err)
		}
	}
	if m.daemon != nil && m.daemon.Process != nil {
		m.daemon.Process.Signal(syscall.SIGTERM)
		select {
		case werr := <-m.done:
			if werr != nil && check {
				errs = append(errs, fmt.Errorf("qemu-storage-daemon: %w", werr))
			}
		case <-time.After(30 * time.Second):
			m.daemon.Process.Kill()
			<-m.done
			errs = append(errs, errors.New("qemu-storage-daemon did not stop on SIGTERM; killed"))
		}
	}
	if err := os.RemoveAll(m.dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// applier carries out ops on a mounted file system.
type applier struct {
	root *os.Root
	src  tree
	rep  *ApplyReport
}

func (w *applier) skip(p, why string) { w.rep.Skipped = append(w.rep.Skipped, Skip{Path: p, Why: why}) }

func (w *applier) run(ctx context.Context, ops []Op) error {
	var dirs []Op // directory times, set last (children change them)
	for _, o := range ops {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !path.IsAbs(o.Path) || path.Clean(o.Path) != o.Path {
			return fmt.Errorf("op %s %q: not a clean absolute path", o.Kind, o.Path)
		}
		rel := strings.TrimPrefix(o.Path, "/")
		if rel == "" {
			rel = "."
		}
		if why := w.parentsOK(rel); why != "" {
			w.skip(o.Path, why)
			continue
		}
		if o.Kind != OpRemove && o.Entry == nil {
			return fmt.Errorf("op %s %s: no entry", o.Kind, o.Path)
		}
		var err error
		switch o.Kind {
		case OpRemove:
			err = w.remove(o.Path, rel)
		case OpMkdir:
			err = w.mkdir(o, rel)
			if err == nil {
				dirs = append(dirs, o)
			}
		case OpSymlink:
			err = w.symlink(o, rel)
		case OpWrite:
			err = w.write(o, rel)
		default:
			return fmt.Errorf("op %q on %s: unknown", o.Kind, o.Path)
		}
		if err != nil {
			return fmt.Errorf("%s %s: %w", o.Kind, o.Path, err)
		}
	}
	sort.Slice(dirs, func(i, j int) bool { return dirs[i].Path > dirs[j].Path })
	for _, o := range dirs {
		rel := strings.TrimPrefix(o.Path, "/")
		if rel == "" {
			rel = "."
		}
		if err := w.root.Chtimes(rel, o.Entry.MTime, o.Entry.MTime); err != nil {
			return fmt.Errorf("times of %s: %w", o.Path, err)
		}
	}
	return nil
}

// parentsOK checks that every parent of rel is a directory (not a link),
// and says why not.
func (w *applier) parentsOK(rel string) string {
	dir := path.Dir(rel)
	if dir == "." {
		return ""
	}
	parts := strings.Split(dir, "/")
	for i := range parts {
		p := strings.Join(parts[:i+1], "/")
		fi, err := w.root.Lstat(p)
		if err != nil {
			return "its parent /" + p + " is missing"
		}
		if !fi.IsDir() {
			return "its parent /" + p + " is not a directory"
		}
	}
	return ""
}

// clear removes what stands at rel when it is not a directory (or is an
// empty one); it says why not when it cannot.
func (w *applier) clear(rel string, keepDir bool) (string, error) {
	fi, err := w.root.Lstat(rel)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if fi.IsDir() {
		if keepDir {
			return "", nil
		}
		if err := w.root.Remove(rel); err != nil {
			return "a directory that is not empty stands there", nil
		}
		return "", nil
	}
	return "", w.root.Remove(rel)
}

func (w *applier) remove(p, rel string) error {
	fi, err := w.root.Lstat(rel)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := w.root.Remove(rel); err != nil {
		if fi.IsDir() {
			w.skip(p, "kept: the directory is not empty in the result")
			return nil
		}
		return err
	}
	w.rep.Removed++
	return nil
}

// attrs sets owner and mode (owner first: chown clears set-id bits).
func (w *applier) attrs(rel string, e *Entry) error {
	if err := w.root.Lchown(rel, int(e.UID), int(e.GID)); err != nil {
		return err
	}
	return w.root.Chmod(rel, fileMode(e.Mode))
}

func fileMode(octal string) os.FileMode {
	v, _ := strconv.ParseUint(octal, 8, 32)
	m := os.FileMode(v & 0o777)
	if v&0o4000 != 0 {
		m |= os.ModeSetuid
	}
	if v&0o2000 != 0 {
		m |= os.ModeSetgid
	}
	if v&0o1000 != 0 {
		m |= os.ModeSticky
	}
	return m
}

func (w *applier) mkdir(o Op, rel string) error {
	if rel != "." {
		if why, err := w.clear(rel, true); err != nil || why != "" {
			if why != "" {
				w.skip(o.Path, why)
			}
			return err
		}
		if err := w.root.Mkdir(rel, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	w.rep.Made++
	return w.attrs(rel, o.Entry)
}

func (w *applier) symlink(o Op, rel string) error {
	if why, err := w.clear(rel, false); err != nil || why != "" {
		if why != "" {
			w.skip(o.Path, why)
		}
		return err
	}
	if err := w.root.Symlink(o.Entry.Target, rel); err != nil {
		return err
	}
	w.rep.Made++
	return w.root.Lchown(rel, int(o.Entry.UID), int(o.Entry.GID))
}

func (w *applier) write(o Op, rel string) error {
	from := o.From
	if from == "" {
		from = o.Path
	}
	if why, err := w.clear(rel, false); err != nil || why != "" {
		if why != "" {
			w.skip(o.Path, why)
		}
		return err
	}
	in, err := w.src.OpenFile(fsPath(from), os.O_RDONLY)
	if err != nil {
		return fmt.Errorf("source %s: %w", from, err)
	}
	defer in.Close()
	out, err := w.root.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if sum := hex.EncodeToString(h.Sum(nil)); o.Entry.SHA256 != "" && sum != o.Entry.SHA256 {
		return fmt.Errorf("source %s: read sha256 %s, the manifest says %s", from, sum, o.Entry.SHA256)
	}
	if err := w.attrs(rel, o.Entry); err != nil {
		return err
	}
	if err := w.root.Chtimes(rel, o.Entry.MTime, o.Entry.MTime); err != nil {
		return err
	}
	w.rep.Written++
	w.rep.BytesWritten += n
	return nil
}
