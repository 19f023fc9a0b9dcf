package images

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"

	"github.com/cvd-project/cvd/internal/fsutil"
	"github.com/cvd-project/cvd/internal/proc"
)

// BootDir holds the files a desktop boots from directly (kernels, initrds),
// each named by the SHA-256 of its content.
const BootDir = "boot"

// MaxBootFile bounds a boot file (a kernel or an initrd) the store takes.
const MaxBootFile = 1 << 30

// DesktopBoot is how a desktop boots, the same on every device: part of its
// record, it travels with it. Each device defines its VM from it with its own
// identity (UUID, MAC) and keeps its own later edits of the VM.
type DesktopBoot struct {
	// Kernel and Initrd name files of the store's boot directory by their
	// SHA-256 (a direct kernel boot with Cmdline); an empty Kernel boots from
	// the system disk.
	Kernel    string `json:"kernel,omitempty"`
	Initrd    string `json:"initrd,omitempty"`
	Cmdline   string `json:"cmdline,omitempty"`
	MemoryMiB uint   `json:"memory_mib,omitempty"`
	VCPUs     uint   `json:"vcpus,omitempty"`
	// NICs is the number of network interfaces (0 or 1).
	NICs int `json:"nics,omitempty"`
}

// Files lists the boot files the configuration names.
func (b *DesktopBoot) Files() []string {
	var out []string
	for _, f := range []string{b.Kernel, b.Initrd} {
		if f != "" {
			out = append(out, f)
		}
	}
	return out
}

var bootFileRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// CheckBoot refuses a configuration that names no valid files or asks for
// what cvd cannot define.
func CheckBoot(b *DesktopBoot) error {
	if b == nil {
		return nil
	}
	for _, f := range b.Files() {
		if !bootFileRE.MatchString(f) {
			return fmt.Errorf("%w: boot file %q: want a SHA-256", ErrInvalid, f)
		}
	}
	if b.Initrd != "" && b.Kernel == "" {
		return fmt.Errorf("%w: an initrd without a kernel", ErrInvalid)
	}
	if b.NICs < 0 || b.NICs > 1 {
		return fmt.Errorf("%w: %d network interfaces: cvd defines 0 or 1", ErrInvalid, b.NICs)
	}
	if b.MemoryMiB > 1<<22 || b.VCPUs > 1024 {
		return fmt.Errorf("%w: %d MiB, %d vCPUs", ErrInvalid, b.MemoryMiB, b.VCPUs)
	}
	return nil
}

// BootFile is the path of a boot file (by its SHA-256).
func (s *Store) BootFile(sum string) string { return s.Path(BootDir + "/" + sum) }

// HasBootFile reports whether the store holds the boot file sum.
func (s *Store) HasBootFile(sum string) bool {
	if !bootFileRE.MatchString(sum) {
		return false
	}
	_, err := os.Stat(s.BootFile(sum))
	return err == nil
}

// ErrBootFileMismatch: a boot file's content is not the SHA-256 it was asked
// under.
var ErrBootFileMismatch = errors.New("boot file content does not match its SHA-256")

// AddBootFile copies r (at most max bytes) into the boot directory under its
// SHA-256, which it returns; want, when given, must be that sum. The file is
// written under a temporary name, synced and renamed.
func (s *Store) AddBootFile(r io.Reader, want string, max int64) (string, error) {
	if err := s.writable(); err != nil {
		return "", err
	}
	dir := s.Path(BootDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, proc.TempPrefix()+"boot-")
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(r, max+1))
	if err == nil && n > max {
		err = fmt.Errorf("%w: boot file larger than %d bytes", ErrInvalid, max)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", err
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if want != "" && sum != want {
		return "", fmt.Errorf("%w: got %s, want %s", ErrBootFileMismatch, sum[:12], want)
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, s.BootFile(sum)); err != nil {
		return "", err
	}
	return sum, fsutil.Sync(dir)
}

// SetDesktopBoot records how the desktop boots (nil: from its system disk,
// with the defaults). Every file it names must be in the store.
func (s *Store) SetDesktopBoot(name string, b *DesktopBoot) (*Desktop, error) {
	if err := CheckBoot(b); err != nil {
		return nil, err
	}
	if b != nil {
		for _, f := range b.Files() {
			if !s.HasBootFile(f) {
				return nil, fmt.Errorf("boot file %s: %w", f[:12], ErrNotFound)
			}
		}
	}
	return s.UpdateDesktop(nil, name, func(d *Desktop) error {
		d.Boot = b
		return nil
	})
}
