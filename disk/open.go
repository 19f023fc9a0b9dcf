package disk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	qcow2reader "github.com/lima-vm/go-qcow2reader"
	"github.com/lima-vm/go-qcow2reader/image"
	"github.com/lima-vm/go-qcow2reader/image/qcow2"
	"github.com/lima-vm/go-qcow2reader/image/raw"
)

// Open opens the image at path and its backing chain. Backing layers are always
// read-only; the top is writable unless opts.ReadOnly.
func Open(path string, opts OpenOptions) (Image, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	roots := opts.AllowedRoots
	if len(roots) == 0 {
		roots = []string{filepath.Dir(abs)}
	}
	c := chainOpener{maxDepth: opts.MaxDepth, seen: map[string]bool{}, noBacking: opts.NoBacking, noBarriers: opts.NoBarriers,
		directData: opts.DirectData && !opts.ReadOnly, keys: keysOr(opts.Keys)}
	if c.maxDepth <= 0 {
		c.maxDepth = DefaultMaxDepth
	}
	for _, r := range roots {
		ra, err := filepath.Abs(r)
		if err != nil {
			return nil, err
		}
		if real, err := filepath.EvalSymlinks(ra); err == nil {
			ra = real
		}
		c.roots = append(c.roots, ra)
	}
	return c.open(abs, opts.Format, opts.ReadOnly, 0)
}

type chainOpener struct {
	roots      []string
	maxDepth   int
	seen       map[string]bool
	noBacking  bool
	noBarriers bool
	directData bool // the top's data writes (see OpenOptions.DirectData)
	keys       KeyFunc
}

func (c *chainOpener) open(path string, format Format, readOnly bool, depth int) (Image, error) {
	if depth >= c.maxDepth {
		return nil, fmt.Errorf("%s: %w (more than %d layers)", path, ErrChainTooDeep, c.maxDepth)
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, err
	}
	if c.seen[real] {
		return nil, fmt.Errorf("%s: %w", path, ErrBackingLoop)
	}
	c.seen[real] = true
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !fi.Mode().IsRegular() && fi.Mode()&os.ModeDevice == 0 {
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file or block device", path)
	}
	size := fi.Size()
	if format == "" {
		if format, err = probe(f, size); err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	switch format {
	case FormatRaw:
		return &Raw{f: f, path: path, size: size, readOnly: readOnly}, nil
	case FormatQcow2:
	default:
		f.Close()
		return nil, fmt.Errorf("%s: %w: format %q", path, ErrUnsupported, format)
	}
	q, err := newQcow2(f, path, size, readOnly)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	q.barriers = !c.noBarriers
	if q.encrypted() && c.keys != nil {
		keys, err := c.keys(path)
		if err == nil && len(keys) > 0 {
			err = ErrBadKey
			for _, k := range keys {
				if err = q.unlock(k); !errors.Is(err, ErrBadKey) {
					break
				}
			}
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	if c.directData && depth == 0 && !readOnly {
		q.direct = openDirect(path) // nil where O_DIRECT is refused
	}
	if q.h.backingName != "" && !c.noBacking {
		bpath, err := c.resolve(filepath.Dir(path), q.h.backingName)
		if err != nil {
			q.closeDirect()
			f.Close()
			return nil, fmt.Errorf("%s: backing file %q: %w", path, q.h.backingName, err)
		}
		b, err := c.open(bpath, Format(q.h.backingFormat), true, depth+1)
		if err != nil {
			q.closeDirect()
			f.Close()
			return nil, fmt.Errorf("%s: open backing file: %w", path, err)
		}
		q.backing = b
	}
	return q, nil
}

// resolve turns a backing file name found in an image in dir into a path inside
// one of the allowed roots.
func (c *chainOpener) resolve(dir, name string) (string, error) {
	if strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("%w: name contains NUL", ErrBackingEscape)
	}
	if strings.HasPrefix(name, "json:") || (strings.Contains(name, "://") && !filepath.IsAbs(name)) {
		return "", fmt.Errorf("%w: protocol names are not allowed", ErrBackingEscape)
	}
	p := name
	if !filepath.IsAbs(p) {
		p = filepath.Join(dir, p)
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", err
	}
	for _, r := range c.roots {
		if rel, err := filepath.Rel(r, real); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel) {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w: %s is outside %s", ErrBackingEscape, real, strings.Join(c.roots, ", "))
}

// Probe names the format of the file at path: qcow2, raw, or an error wrapping
// ErrUnsupported that names a format cvd does not handle (vmdk, vhdx, vdi, ...).
func Probe(path string) (Format, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	return probe(f, fi.Size())
}

func probe(r io.ReaderAt, size int64) (Format, error) {
	var m [4]byte
	if n, _ := r.ReadAt(m[:], 0); n == 4 && string(m[:]) == "QFI\xfb" {
		return FormatQcow2, nil
	}
	// Name the formats go-qcow2reader recognizes and cvd does not handle.
	for _, t := range qcow2reader.Types {
		if t == qcow2.Type || t == raw.Type {
			continue
		}
		err := probeType(r, t)
		if err == nil || !errors.Is(err, image.ErrWrongType) {
			return "", fmt.Errorf("%w: %s image (convert it to qcow2 or raw with qemu-img convert)", ErrUnsupported, t)
		}
	}
	return FormatRaw, nil
}

// probeType asks go-qcow2reader whether r is an image of type t. It guards the
// library, which can panic on malformed input and returns typed-nil images.
func probeType(r io.ReaderAt, t image.Type) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%s probe: %v", t, p)
		}
	}()
	img, err := qcow2reader.OpenWithType(r, t)
	if err == nil && img != nil {
		img.Close()
	}
	return err
}
