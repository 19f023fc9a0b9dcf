package files

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/ext4"

	"github.com/cvd-project/cvd/disk"
)

// Errors. Test with errors.Is.
var (
	// ErrNoFileSystem: the disk holds no file system this package reads.
	ErrNoFileSystem = errors.New("no ext4 file system found on the disk")
	// ErrCorrupt: a file system that does not hold together (a directory
	// loop, nesting beyond maxDepth, a structure the reader chokes on).
	ErrCorrupt = errors.New("corrupt file system")
)

// maxDepth bounds the nesting of directories a walk follows.
const maxDepth = 256

// Entry is one file of a file system.
type Entry struct {
	Path   string    `json:"path"` // absolute, "/" for the root
	Type   string    `json:"type"` // file, dir, symlink, other
	Mode   string    `json:"mode"` // permission and special bits, octal: "0644", "1777"
	UID    uint32    `json:"uid"`
	GID    uint32    `json:"gid"`
	Size   int64     `json:"size"`
	MTime  time.Time `json:"mtime"`
	SHA256 string    `json:"sha256,omitempty"` // regular files
	Target string    `json:"target,omitempty"` // symbolic links
}

// FileSystem is one file system of a disk with its files, sorted by path.
type FileSystem struct {
	// Partition is the partition's number (1 up) in the disk's table, 0 for a
	// file system on the whole disk.
	Partition int    `json:"partition"`
	Type      string `json:"type"`
	Label     string `json:"label,omitempty"`
	Start     int64  `json:"start"` // bytes into the disk
	Size      int64  `json:"size"`
	// NeedsRecovery: its journal holds changes not yet in place (the file
	// system was not cleanly unmounted); the manifest shows it without them.
	NeedsRecovery bool    `json:"needs-recovery,omitempty"`
	Files         []Entry `json:"files"`
}

// Manifest lists the files of every ext4 and FAT32 file system on the disk
// img: on the whole disk, or in each partition of its GPT or MBR table.
func Manifest(ctx context.Context, img disk.Image) (out []FileSystem, err error) {
	defer func() {
		// go-diskfs may panic on a malformed file system: an error, not a crash.
		if p := recover(); p != nil {
			out, err = nil, fmt.Errorf("%s: %w: %v", img.Info().Path, ErrCorrupt, p)
		}
	}()
	st := newStorage(img)
	for _, r := range regions(st) {
		// cvd's own checks of the superblock and descriptors first: go-diskfs
		// sizes its allocations from them unchecked.
		g, err := readGeometry(ctx, st, r.start, r.size)
		if errors.Is(err, errNotExt4) {
			m, err := fatManifest(ctx, st, r)
			if errors.Is(err, errNotFAT) {
				continue
			} else if err != nil {
				return nil, fmt.Errorf("%s: partition %d: %w", img.Info().Path, r.n, err)
			}
			out = append(out, *m)
			continue
		} else if err != nil {
			return nil, fmt.Errorf("%s: partition %d: %w", img.Info().Path, r.n, err)
		}
		fsys, err := ext4.Read(st, r.size, r.start, 512)
		if err != nil {
			continue // not ext4 (or not a file system)
		}
		m := FileSystem{Partition: r.n, Type: "ext4", Label: fsys.Label(), Start: r.start, Size: r.size, NeedsRecovery: g.recover}
		w := walker{fsys: fsys, seen: map[uint32]bool{}, g: g}
		if err := w.walk(ctx, "/", 0, &m.Files); err != nil {
			return nil, fmt.Errorf("partition %d: %w", r.n, err)
		}
		sort.Slice(m.Files, func(i, j int) bool { return m.Files[i].Path < m.Files[j].Path })
		out = append(out, m)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: %w", img.Info().Path, ErrNoFileSystem)
	}
	return out, nil
}

// walker lists a file system's tree, each directory once.
type walker struct {
	fsys tree
	seen map[uint32]bool // directory inodes listed
	// inodes, when set, gets each path's inode number and files are not
	// hashed (FilesIn).
	inodes map[string]uint32
	// entries counts what the walk listed (bounded: a FAT directory may name
	// an ancestor, which no inode number betrays); maxSize bounds a file's
	// size (the file system's).
	entries int
	maxSize int64
	// g, on ext4, reads inodes and file contents directly (cvd's parser)
	// instead of a path lookup per file.
	g   *geometry
	buf []byte // hashInode's
}

// tree is what a walk reads of a file system (go-diskfs's ext4 and FAT32
// both have it).
type tree interface {
	ReadDir(p string) ([]fs.DirEntry, error)
	Stat(p string) (fs.FileInfo, error)
	OpenFile(p string, flag int) (filesystem.File, error)
}

// emptySHA256 is the SHA-256 of no bytes.
const emptySHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// maxEntries bounds the files one walk lists.
const maxEntries = 4 << 20

// walk lists dir and everything below it.
func (w *walker) walk(ctx context.Context, dir string, depth int, out *[]Entry) error {
	fsys := w.fsys
	if err := ctx.Err(); err != nil {
		return err
	}
	if depth > maxDepth {
		return fmt.Errorf("%w: %s nests deeper than %d directories", ErrCorrupt, dir, maxDepth)
	}
	if dir == "/" {
		fi, err := fsys.Stat(".")
		if err != nil {
			return fmt.Errorf("stat /: %w", err)
		}
		*out = append(*out, entryOf("/", fi))
	}
	ents, err := fsys.ReadDir(fsPath(dir))
	if err != nil {
		return fmt.Errorf("read directory %s: %w", dir, err)
	}
	for _, de := range ents {
		name := de.Name()
		if name == "." || name == ".." {
			continue
		}
		p := path.Join(dir, name)
		var fi fs.FileInfo
		var raw []byte // the inode, on ext4 with cvd's geometry
		if w.g != nil {
			// The entry's info (no path lookup), and its inode's permissions.
			fi, err = de.Info()
		} else {
			fi, err = fsys.Stat(fsPath(p))
		}
		if err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		e := entryOf(p, fi)
		if w.g != nil {
			st, ok := fi.Sys().(*ext4.StatT)
			if !ok || st == nil {
				return fmt.Errorf("%w: %s has no inode", ErrCorrupt, p)
			}
			if raw, err = w.g.inode(int64(st.Ino)); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			e.Mode = fmt.Sprintf("%04o", binary.LittleEndian.Uint16(raw)&0o7777)
		}
		if w.entries++; w.entries > maxEntries {
			return fmt.Errorf("%w: more than %d files", ErrCorrupt, maxEntries)
		}
		if w.maxSize > 0 && e.Size > w.maxSize {
			return fmt.Errorf("%w: %s claims %d bytes in a %d-byte file system", ErrCorrupt, p, e.Size, w.maxSize)
		}
		if st, ok := fi.Sys().(*ext4.StatT); ok && st != nil && w.inodes != nil {
			w.inodes[p] = st.Ino
		}
		switch e.Type {
		case "file":
			if w.inodes != nil {
				break
			}
			if e.Size == 0 {
				// (FAT keeps no cluster for an empty file: nothing to open.)
				e.SHA256 = emptySHA256
				break
			}
			if raw != nil {
				if w.buf == nil {
					w.buf = make([]byte, 1<<20)
				}
				e.SHA256, err = w.g.hashInode(raw, e.Size, w.buf)
				if err == nil {
					break
				}
				if !errors.Is(err, ErrUnsupportedFS) {
					return fmt.Errorf("%s: %w", p, err)
				}
			}
			if e.SHA256, err = hashFile(fsys, p); err != nil {
				return err
			}
		case "dir":
			*out = append(*out, e)
			if st, ok := fi.Sys().(*ext4.StatT); ok && st != nil {
				if w.seen[st.Ino] {
					return fmt.Errorf("%w: directory %s (inode %d) is listed twice", ErrCorrupt, p, st.Ino)
				}
				w.seen[st.Ino] = true
			}
			if err := w.walk(ctx, p, depth+1, out); err != nil {
				return err
			}
			continue
		}
		*out = append(*out, e)
	}
	return nil
}

// fsPath is an absolute path as go-diskfs takes it (io/fs style: "." for the
// root, no leading slash).
func fsPath(p string) string {
	if p = strings.TrimPrefix(p, "/"); p == "" {
		return "."
	}
	return p
}

func entryOf(p string, fi fs.FileInfo) Entry {
	m := fi.Mode()
	e := Entry{Path: p, Size: fi.Size(), MTime: fi.ModTime().UTC()}
	switch {
	case m.IsDir() || fi.IsDir():
		e.Type, e.Size = "dir", 0
	case m&fs.ModeSymlink != 0:
		e.Type = "symlink"
	case m.IsRegular():
		e.Type = "file"
	default:
		e.Type = "other"
	}
	perm := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		perm |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		perm |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		perm |= 0o1000
	}
	e.Mode = fmt.Sprintf("%04o", perm)
	if st, ok := fi.Sys().(*ext4.StatT); ok && st != nil {
		e.UID, e.GID, e.Target = st.UID, st.GID, st.LinkTarget
	}
	return e
}

// maxHoles is the most a file's holes may add up to for hashInode (and no
// more than the file system's size): a sparser file is hashed through
// go-diskfs.
const maxHoles = 1 << 30

// hashInode is the SHA-256 of the size bytes of the file whose inode is raw,
// read through its extent tree (holes and unwritten extents as zeros).
// ErrUnsupportedFS: a file without an extent tree (inline, block-mapped) or
// with more than maxHoles of holes.
func (g *geometry) hashInode(raw []byte, size int64, buf []byte) (string, error) {
	le := binary.LittleEndian
	if le.Uint32(raw[0x20:])&inodeInlineDataFlag != 0 {
		return "", ErrUnsupportedFS
	}
	m, err := g.extentMap(0, raw)
	if err != nil {
		return "", err
	}
	sort.Slice(m, func(i, j int) bool { return m[i].logical < m[j].logical })
	var covered int64
	for _, e := range m {
		covered += e.blocks * g.bs
	}
	if size-covered > min(maxHoles, g.blocks*g.bs) {
		return "", ErrUnsupportedFS
	}
	h := sha256.New()
	zeros := func(n int64) {
		clear(buf)
		for n > 0 {
			k := min(n, int64(len(buf)))
			h.Write(buf[:k])
			n -= k
		}
	}
	var pos int64
	for _, e := range m {
		lo := e.logical * g.bs
		if lo >= size {
			break
		}
		if lo < pos {
			return "", fmt.Errorf("%w: overlapping extents", ErrCorrupt)
		}
		zeros(lo - pos)
		n := min(e.blocks*g.bs, size-lo)
		if e.unwritten {
			zeros(n)
		} else {
			off := g.start + e.phys*g.bs
			for done := int64(0); done < n; {
				k := min(n-done, int64(len(buf)))
				if _, err := g.r.ReadAt(buf[:k], off+done); err != nil {
					return "", err
				}
				h.Write(buf[:k])
				done += k
			}
		}
		pos = lo + n
	}
	zeros(size - pos)
	return hex.EncodeToString(h.Sum(nil)), nil
}

func hashFile(fsys tree, p string) (string, error) {
	f, err := fsys.OpenFile(fsPath(p), os.O_RDONLY)
	if err != nil {
		return "", fmt.Errorf("open %s: %w", p, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Change is one difference between two manifests.
type Change struct {
	Path string `json:"path"`
	Kind string `json:"kind"` // added, removed, changed
	Old  *Entry `json:"old,omitempty"`
	New  *Entry `json:"new,omitempty"`
}

// Diff lists what changed from a to b (both sorted by path, as Manifest gives
// them): files added, removed, and changed in type, content, mode, owner or
// link target (a modification time alone is not a change).
func Diff(a, b []Entry) []Change {
	var out []Change
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || (i < len(a) && a[i].Path < b[j].Path):
			out = append(out, Change{Path: a[i].Path, Kind: "removed", Old: &a[i]})
			i++
		case i == len(a) || b[j].Path < a[i].Path:
			out = append(out, Change{Path: b[j].Path, Kind: "added", New: &b[j]})
			j++
		default:
			x, y := a[i], b[j]
			x.MTime, y.MTime = time.Time{}, time.Time{}
			if x != y {
				out = append(out, Change{Path: b[j].Path, Kind: "changed", Old: &a[i], New: &b[j]})
			}
			i++
			j++
		}
	}
	return out
}
