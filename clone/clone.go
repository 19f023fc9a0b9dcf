package clone

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/fsutil"
)

// Options controls Create.
type Options struct {
	// Name is the clone's name; with Count > 1 it is a prefix: NAME-01, NAME-02...
	// (numbers as wide as the largest).
	Name string
	// Count is how many clones to make; 0 means 1.
	Count int
	// Start is the first number with Count > 1; 0 means 1.
	Start int
	// NoSeed skips the cloud-init seed images.
	NoSeed bool
	// Workers write clones in parallel; 0 means 4 per CPU, at most 16 (the work
	// waits on file creation in one directory more than it computes).
	Workers int
	// FsyncEach syncs every file on its own instead of the whole file system once
	// at the end (syncfs); slower, but it touches only cvd's files.
	FsyncEach bool
	// WorkDir is where go-diskfs stages each seed image's two files; empty means a
	// directory in /dev/shm when it is a writable tmpfs (staging on a disk costs
	// several metadata writes per clone), else the store's clones directory.
	WorkDir string
	// Progress, when set, is called with the clones written and the total.
	Progress func(done, total int)
	// Boot, when set, is recorded in every clone: how it boots under libvirt.
	Boot *images.Boot
}

// Names returns the clone names Create uses for name, count and start.
func Names(name string, count, start int) []string {
	if count <= 1 {
		return []string{name}
	}
	if start <= 0 {
		start = 1
	}
	w := len(strconv.Itoa(start + count - 1))
	out := make([]string, count)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%0*d", name, w, start+i)
	}
	return out
}

// Create makes linked clones of source (a desktop name or a layer reference): for
// each, a writable qcow2 top whose backing file is the sealed layer, named
// relative to the store ("../layers/<id>.qcow2") with its format recorded; a user
// top when the desktop has a user disk; an identity; and a seed image. Either all
// clones are recorded or none (a crash at any moment leaves none half-made: see
// package images).
//
// The backing chain is opened once, to make a template overlay; each clone's top
// is then a copy of the template's few non-zero blocks.
func Create(ctx context.Context, st *images.Store, source string, opts Options) ([]images.Clone, error) {
	count := max(opts.Count, 1)
	if opts.Name == "" {
		return nil, fmt.Errorf("%w: a clone needs a name", images.ErrInvalid)
	}
	src, err := st.ResolveCloneSource(source)
	if err != nil {
		return nil, err
	}
	names := Names(opts.Name, count, opts.Start)
	used, err := st.CloneNamesFree(names)
	if err != nil {
		return nil, err
	}
	ids, err := NewIdentities(names, used)
	if err != nil {
		return nil, err
	}
	dir := st.Path(images.ClonesDir)
	sysT, err := templateOn(st, dir, src.Layer, 0)
	if err != nil {
		return nil, err
	}
	mid, err := identityOf(ctx, st, src.Layer)
	if err != nil {
		return nil, err
	}
	var userT *Template
	if src.HasUser {
		if userT, err = templateOn(st, dir, src.UserLayer, src.UserSize); err != nil {
			return nil, err
		}
	}

	now := time.Now().UTC().Truncate(time.Second)
	recs := make([]images.Clone, count)
	var files []string
	for i, n := range names {
		sys, user, seed := images.CloneFiles(n)
		recs[i] = images.Clone{Name: n, UUID: ids[i].UUID, MAC: ids[i].MAC, Hostname: ids[i].Hostname,
			Desktop: src.Desktop, Version: src.Version, Layer: src.Layer, Disk: sys, Created: now, Boot: opts.Boot}
		if mid != nil {
			recs[i].MachineID = strings.ReplaceAll(ids[i].UUID, "-", "")
		}
		files = append(files, sys)
		if userT != nil {
			recs[i].UserLayer, recs[i].UserDisk = src.UserLayer, user
			files = append(files, user)
		}
		if !opts.NoSeed {
			recs[i].Seed = seed
			files = append(files, seed)
		}
	}
	work := dir
	if !opts.NoSeed {
		w, cleanup, err := seedWorkDir(opts.WorkDir, dir)
		if err != nil {
			return nil, err
		}
		defer cleanup()
		work = w
	}
	p, err := st.Begin("clone", files)
	if err != nil {
		return nil, err
	}
	fail := func(err error) ([]images.Clone, error) {
		p.Abort()
		return nil, err
	}

	// The first clone is written alone and opened with its chain: a wrong template
	// fails here, not a thousand times.
	if err := writeClone(st, &recs[0], ids[0], sysT, userT, mid, work, opts.FsyncEach); err != nil {
		return fail(err)
	}
	img, err := st.OpenTop(recs[0].Disk, true, false)
	if err != nil {
		return fail(fmt.Errorf("clone %s: %w", recs[0].Name, err))
	}
	img.Close()

	workers := opts.Workers
	if workers <= 0 {
		workers = min(4*runtime.GOMAXPROCS(0), 16)
	}
	var (
		next  atomic.Int64
		done  atomic.Int64
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	next.Store(1)
	done.Store(1)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= count {
					return
				}
				err := ctx.Err()
				if err == nil {
					err = writeClone(st, &recs[i], ids[i], sysT, userT, mid, work, opts.FsyncEach)
				}
				if err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					next.Store(int64(count))
					return
				}
				d := done.Add(1)
				if opts.Progress != nil && d%64 == 0 {
					opts.Progress(int(d), count)
				}
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return fail(first)
	}
	if opts.Progress != nil {
		opts.Progress(count, count)
	}
	if !opts.FsyncEach {
		if err := syncFS(dir); err != nil {
			return fail(err)
		}
	}
	if err := fsutil.Sync(dir); err != nil {
		return fail(err)
	}
	if err := st.CommitClones(p, recs); err != nil {
		return fail(err)
	}
	return recs, nil
}

// templateOn makes the template of a top on layer id ("" for a blank disk of size
// bytes), to be written in dir.
func templateOn(st *images.Store, dir, id string, size int64) (*Template, error) {
	co := disk.CreateOptions{Size: size, AllowedRoots: []string{st.Dir()}}
	if id != "" {
		l, err := st.Layer(id)
		if err != nil {
			return nil, err
		}
		co.Size = l.Size
		co.BackingFile = st.LayerPath(l.ID)
		co.BackingFormat = disk.FormatQcow2
	}
	if co.Size <= 0 {
		return nil, errors.New("a blank user disk needs a size")
	}
	return NewTemplate(dir, co)
}

func writeClone(st *images.Store, rec *images.Clone, id Identity, sysT, userT *Template, mid *guestIdentity, work string, fsync bool) error {
	if err := sysT.Write(st.Path(rec.Disk), fsync); err != nil {
		return fmt.Errorf("clone %s: %w", rec.Name, err)
	}
	if mid != nil {
		if err := writeIdentity(st, rec, mid, fsync); err != nil {
			return fmt.Errorf("clone %s: identity: %w", rec.Name, err)
		}
	}
	if userT != nil {
		if err := userT.Write(st.Path(rec.UserDisk), fsync); err != nil {
			return fmt.Errorf("clone %s: %w", rec.Name, err)
		}
	}
	if rec.Seed != "" {
		p := st.Path(rec.Seed)
		if err := WriteSeed(p, work, id); err != nil {
			return fmt.Errorf("clone %s: %w", rec.Name, err)
		}
		if fsync {
			if err := fsutil.Sync(p); err != nil {
				return err
			}
		}
	}
	return nil
}

// Remove removes clones and their files; layers are never touched.
func Remove(st *images.Store, names ...string) ([]images.Clone, error) {
	return st.RemoveClones(names)
}

func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// shmDir is where seed images are staged when it is a writable directory.
var shmDir = "/dev/shm"

// seedWorkDir returns the directory seeds are staged in, and a function that
// removes it. Without a choice, it is a fresh "cvd-seed-<pid>-*" directory in
// /dev/shm (those of dead processes are removed first), or the store's clones
// directory, where a crash leaves ".tmp-" entries that the store's recovery
// removes.
func seedWorkDir(choice, clonesDir string) (string, func(), error) {
	if choice != "" {
		return choice, func() {}, nil
	}
	if fi, err := os.Stat(shmDir); err == nil && fi.IsDir() && unix.Access(shmDir, unix.W_OK) == nil {
		sweepSeedDirs(shmDir)
		d, err := os.MkdirTemp(shmDir, fmt.Sprintf("cvd-seed-%d-", os.Getpid()))
		if err == nil {
			return d, func() { os.RemoveAll(d) }, nil
		}
	}
	return clonesDir, func() {}, nil
}

// sweepSeedDirs removes the staging directories of processes that are gone.
func sweepSeedDirs(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), "cvd-seed-")
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 {
			continue
		}
		if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}
