package testutil

import (
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
)

// The private PostgreSQL cluster of one test binary: started at the first
// Postgres call, on a unix socket in a temporary directory (no TCP), run as the
// "postgres" user when the tests run as root, and killed when the test binary
// exits (the parent-death signal of its thread).
var pg struct {
	once sync.Once
	url  string // of the maintenance database
	sock string
	err  error
	n    atomic.Int64
}

// pgBinDir finds the newest installed PostgreSQL's binaries.
func pgBinDir() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		a, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		b, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return a < b
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i], nil
		}
	}
	return "", fmt.Errorf("initdb not found (Debian package postgresql)")
}

// Postgres returns the URL of a new, empty database in the test binary's private
// PostgreSQL cluster. It skips the test when PostgreSQL is not installed, or
// fails it when CVD_TEST_REQUIRE names "postgres".
func Postgres(t testing.TB) string {
	t.Helper()
	pg.once.Do(startPostgres)
	if pg.err != nil {
		if Required("postgres") {
			t.Fatalf("PostgreSQL is required (CVD_TEST_REQUIRE=%s): %v", os.Getenv("CVD_TEST_REQUIRE"), pg.err)
		}
		t.Skipf("no PostgreSQL: %v; set CVD_TEST_REQUIRE=postgres to make this a failure", pg.err)
	}
	db, err := sql.Open("pgx", pg.url)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	name := fmt.Sprintf("t%d_%d", os.Getpid(), pg.n.Add(1))
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatalf("create database: %v", err)
	}
	return fmt.Sprintf("postgres://cvd@/%s?host=%s", name, pg.sock)
}

func startPostgres() {
	bin, err := pgBinDir()
	if err != nil {
		pg.err = err
		return
	}
	var cred *syscall.Credential
	if os.Getuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			pg.err = fmt.Errorf("PostgreSQL will not run as root and there is no postgres user: %w", err)
			return
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	sweepPostgres()
	dir, err := os.MkdirTemp("", "cvd-pg-")
	if err != nil {
		pg.err = err
		return
	}
	data, sock := filepath.Join(dir, "data"), filepath.Join(dir, "sock")
	for _, d := range []string{dir, data, sock} {
		os.MkdirAll(d, 0o700)
		if cred != nil {
			os.Chown(d, int(cred.Uid), int(cred.Gid))
		}
	}
	os.Chmod(dir, 0o755)
	initdb := exec.Command(filepath.Join(bin, "initdb"), "-D", data, "-A", "trust", "-U", "cvd", "--no-sync")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		pg.err = fmt.Errorf("initdb: %v\n%s", err, out)
		return
	}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal follows the thread that started the server:
		// keep this goroutine on its thread for the life of the test binary.
		runtime.LockOSThread()
		// Dynamic shared memory in files of the data directory (mmap), not
		// in /dev/shm: the cluster is killed with the test binary, and its
		// segments then go with its directory.
		cmd := exec.Command(filepath.Join(bin, "postgres"), "-D", data, "-k", sock,
			"-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200",
			"-c", "dynamic_shared_memory_type=mmap")
		logf, _ := os.Create(filepath.Join(dir, "postgres.log"))
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL, Setpgid: true}
		err := cmd.Start()
		started <- err
		if err == nil {
			cmd.Wait()
		}
		select {} // never give the thread back
	}()
	if err := <-started; err != nil {
		pg.err = fmt.Errorf("start postgres: %w", err)
		return
	}
	pg.sock = sock
	pg.url = fmt.Sprintf("postgres://cvd@/postgres?host=%s", sock)
	db, err := sql.Open("pgx", pg.url)
	if err != nil {
		pg.err = err
		return
	}
	defer db.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err = db.Ping(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "postgres.log"))
			pg.err = fmt.Errorf("postgres did not answer in 30 s: %v\n%s", err, log)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// sweepPostgres removes the clusters of test binaries that are gone.
func sweepPostgres() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "cvd-pg-*"))
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "data", "postmaster.pid"))
		if err == nil {
			var pid int
			fmt.Sscanf(string(b), "%d", &pid)
			if pid > 0 && syscall.Kill(pid, 0) == nil {
				continue
			}
		}
		if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > time.Minute {
			os.RemoveAll(d)
		}
	}
}

// Catalog is the catalog URL for a store a test makes: "" (the store's embedded
// SQLite catalog) unless CVD_TEST_CATALOG=postgres, then a new database of the
// private PostgreSQL cluster. make test runs the store's suites both ways.
func Catalog(t testing.TB) string {
	t.Helper()
	switch v := os.Getenv("CVD_TEST_CATALOG"); v {
	case "", "sqlite":
		return ""
	case "postgres":
		return Postgres(t)
	default:
		t.Fatalf("CVD_TEST_CATALOG=%q: want sqlite or postgres", v)
		return ""
	}
}
