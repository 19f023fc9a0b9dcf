package catalog

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers "pgx"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
	_ "modernc.org/sqlite" // registers "sqlite"
)

// Engines.
const (
	SQLite   = "sqlite"
	Postgres = "postgres"
)

// Sentinel errors.
var (
	// ErrBusy: a write waited longer than Options.WriteWait for other writers.
	ErrBusy = errors.New("catalog busy: another process has been writing too long")
	// ErrReadOnly: an Update on a catalog opened read-only.
	ErrReadOnly = errors.New("catalog opened read-only")
	// ErrNotExist: a read-only open of an SQLite catalog that does not exist.
	ErrNotExist = errors.New("catalog does not exist")
)

//go:embed migrations
var migrations embed.FS

// Options controls Open.
type Options struct {
	// ReadOnly refuses Update and, for SQLite, requires the file to exist.
	ReadOnly bool
	// WriteWait bounds how long Update waits for other writers (default 30 s).
	WriteWait time.Duration
	// Context is the default context of View and Update (default Background):
	// cancelling it makes a waiting writer give up.
	Context context.Context
}

// DB is an open catalog. It is safe for concurrent use.
type DB struct {
	engine   string
	url      string
	ro, rw   *sql.DB // readers; the writer (for SQLite one connection per process)
	readOnly bool
	wait     time.Duration
	ctx      context.Context
	applied  []int64 // the migrations this open applied
	locks    locks   // site-wide advisory locks held by this process (lock.go)
	lockDB   *sql.DB // PostgreSQL: the pool of the locks' one connection
}

// EngineOf tells the engine a catalog URL names, and the data source name for
// its driver.
func EngineOf(u string) (engine, source string, err error) {
	switch {
	case strings.HasPrefix(u, "postgres://"), strings.HasPrefix(u, "postgresql://"):
		return Postgres, u, nil
	case strings.HasPrefix(u, "sqlite:"):
		u = strings.TrimPrefix(u, "sqlite:")
	case strings.Contains(u, "://"):
		return "", "", fmt.Errorf("catalog %q: want a file path, sqlite:PATH or postgres://…", u)
	}
	if u == "" || strings.ContainsAny(u, "?#") {
		return "", "", fmt.Errorf("catalog %q: want a file path without '?' or '#'", u)
	}
	return SQLite, u, nil
}

// Open opens (creating unless read-only) the catalog at u and brings its schema
// to the newest version this binary knows.
func Open(u string, opts Options) (*DB, error) {
	engine, src, err := EngineOf(u)
	if err != nil {
		return nil, err
	}
	db := &DB{engine: engine, url: u, readOnly: opts.ReadOnly, wait: opts.WriteWait, ctx: opts.Context}
	if db.wait == 0 {
		db.wait = 30 * time.Second
	}
	if db.ctx == nil {
		db.ctx = context.Background()
	}
	switch engine {
	case SQLite:
		if opts.ReadOnly {
			if _, err := os.Stat(src); err != nil {
				return nil, fmt.Errorf("open catalog %s: %w", src, ErrNotExist)
			}
		}
		// Every connection: WAL (readers never wait for the writer), full sync
		// at each commit, a short busy wait (Update retries it, honouring its
		// context). The writer's transactions take the write lock at BEGIN.
		q := "?_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=busy_timeout(200)&_pragma=foreign_keys(1)"
		if db.ro, err = sql.Open("sqlite", src+q+"&_txlock=deferred"); err != nil {
			return nil, err
		}
		if db.rw, err = sql.Open("sqlite", src+q+"&_txlock=immediate"); err != nil {
			db.ro.Close()
			return nil, err
		}
		db.rw.SetMaxOpenConns(1)
		db.ro.SetMaxOpenConns(8)
		db.ro.SetMaxIdleConns(2)
	case Postgres:
		if db.ro, err = sql.Open("pgx", src); err != nil {
			return nil, err
		}
		db.ro.SetMaxOpenConns(16)
		db.rw = db.ro
	}
	if err := db.migrate(); err != nil {
		db.Close()
		return nil, fmt.Errorf("open catalog %s: %w", db.Redacted(), err)
	}
	return db, nil
}

// migrate applies the embedded migrations not yet applied. Several processes may
// open a new catalog at once: PostgreSQL serializes them with goose's session
// lock, SQLite with its write lock (a loser of the race retries once).
func (db *DB) migrate() error {
	if db.readOnly {
		return db.checkVersion()
	}
	// Up to date (every open but a store's first): no need for goose.
	var v int64
	if err := db.ro.QueryRowContext(db.ctx, "SELECT COALESCE(MAX(version_id), 0) FROM goose_db_version WHERE is_applied").Scan(&v); err == nil && v == Version() {
		return nil
	}
	sub, err := fs.Sub(migrations, "migrations/"+db.engine)
	if err != nil {
		return err
	}
	var popts []goose.ProviderOption
	dialect := goose.DialectSQLite3
	if db.engine == Postgres {
		dialect = goose.DialectPostgres
		locker, err := lock.NewPostgresSessionLocker()
		if err != nil {
			return err
		}
		popts = append(popts, goose.WithSessionLocker(locker))
	}
	p, err := goose.NewProvider(dialect, db.rw, sub, popts...)
	if err != nil {
		return fmt.Errorf("migrations: %w", err)
	}
	ctx, cancel := context.WithTimeout(db.ctx, db.wait)
	defer cancel()
	for try := 0; ; try++ {
		var res []*goose.MigrationResult
		res, err = p.Up(ctx)
		for _, r := range res {
			if r.Error == nil {
				db.applied = append(db.applied, r.Source.Version)
			}
		}
		if err == nil || try == 5 || ctx.Err() != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("apply migrations: %w", err)
	}
	return nil
}

// Version is the newest migration this binary carries.
func Version() int64 {
	ents, _ := fs.ReadDir(migrations, "migrations/"+SQLite)
	var n int64
	for _, e := range ents {
		var v int64
		if _, err := fmt.Sscanf(e.Name(), "%d_", &v); err == nil && v > n {
			n = v
		}
	}
	return n
}

// checkVersion refuses a catalog written by a newer binary, or not yet made.
func (db *DB) checkVersion() error {
	var v int64
	err := db.ro.QueryRowContext(db.ctx, "SELECT COALESCE(MAX(version_id), 0) FROM goose_db_version WHERE is_applied").Scan(&v)
	if err != nil {
		return fmt.Errorf("read schema version: %w (is it a cvd catalog?)", err)
	}
	if v < Version() {
		return fmt.Errorf("schema version %d is older than this binary's %d: open it read-write once", v, Version())
	}
	return nil
}

// Applied lists the migrations this open applied (none when the schema was
// current): a package above moves its records into a new table once.
func (db *DB) Applied() []int64 { return db.applied }

// Close closes the catalog.
func (db *DB) Close() error {
	db.closeLocks()
	var err error
	if db.rw != nil && db.rw != db.ro {
		err = db.rw.Close()
	}
	if db.ro != nil {
		if err2 := db.ro.Close(); err == nil {
			err = err2
		}
	}
	return err
}

// Engine is SQLite or Postgres.
func (db *DB) Engine() string { return db.engine }

// Redacted is the catalog's URL without a password.
func (db *DB) Redacted() string {
	if db.engine != Postgres {
		return db.url
	}
	u, err := url.Parse(db.url)
	if err != nil {
		return "postgres://…"
	}
	return u.Redacted()
}

// View runs fn in a read transaction: a consistent snapshot that never waits for
// a writer. fn must not keep the values it reads past its return.
func (db *DB) View(fn func(tx *Tx) error) error { return db.ViewContext(db.ctx, fn) }

// ViewContext is View with a context.
func (db *DB) ViewContext(ctx context.Context, fn func(tx *Tx) error) error {
	opts := &sql.TxOptions{ReadOnly: true}
	if db.engine == Postgres {
		opts.Isolation = sql.LevelRepeatableRead
	}
	stx, err := db.ro.BeginTx(ctx, opts)
	if err != nil {
		return fmt.Errorf("catalog: begin read: %w", err)
	}
	tx := &Tx{db: db, tx: stx, ctx: ctx}
	err = fn(tx)
	if err == nil {
		err = tx.err
	}
	if err2 := stx.Rollback(); err == nil && err2 != nil && !errors.Is(err2, sql.ErrTxDone) {
		err = err2
	}
	return err
}

// Update runs fn in a write transaction and commits it when fn returns nil.
// Writers of every process are serialized; see the package documentation.
func (db *DB) Update(fn func(tx *Tx) error) error { return db.UpdateContext(db.ctx, fn) }

// UpdateContext is Update with a context.
func (db *DB) UpdateContext(ctx context.Context, fn func(tx *Tx) error) error {
	if db.readOnly {
		return ErrReadOnly
	}
	stx, err := db.beginWrite(ctx)
	if err != nil {
		return err
	}
	tx := &Tx{db: db, tx: stx, ctx: ctx, writable: true}
	err = fn(tx)
	if err == nil {
		err = tx.err
	}
	if err != nil {
		stx.Rollback()
		return full(err)
	}
	if err := stx.Commit(); err != nil {
		return full(fmt.Errorf("catalog: commit: %w", err))
	}
	for _, fn := range tx.onCommit {
		fn()
	}
	return nil
}

// postgresWriteLock is the key of the advisory lock that serializes writers.
const postgresWriteLock = 0x637664 // "cvd"

func (db *DB) beginWrite(ctx context.Context) (*sql.Tx, error) {
	deadline := time.Now().Add(db.wait)
	for {
		stx, err := db.rw.BeginTx(ctx, nil)
		if err == nil && db.engine == Postgres {
			if _, err = stx.ExecContext(ctx, "SELECT pg_advisory_xact_lock($1)", postgresWriteLock); err != nil {
				stx.Rollback()
			}
		}
		if err == nil {
			return stx, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("catalog: wait for the write lock: %w", ctx.Err())
		}
		if !isBusy(err) {
			return nil, fmt.Errorf("catalog: begin: %w", err)
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w (waited %v)", ErrBusy, db.wait)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("catalog: wait for the write lock: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// full gives an error of a full disk (SQLite's SQLITE_FULL, PostgreSQL's
// disk_full, 53100) the sentinel syscall.ENOSPC as well, so that callers tell
// it from other failures; the transaction was rolled back, and the next one
// succeeds once there is room again.
func full(err error) error {
	var c interface{ Code() int }
	var pg interface{ SQLState() string }
	if (errors.As(err, &c) && c.Code()&0xff == 13) || (errors.As(err, &pg) && pg.SQLState() == "53100") {
		return fmt.Errorf("%w (%w)", err, syscall.ENOSPC)
	}
	return err
}

// isBusy reports SQLite's SQLITE_BUSY family (another process holds the lock).
func isBusy(err error) bool {
	var c interface{ Code() int }
	if errors.As(err, &c) {
		return c.Code()&0xff == 5
	}
	return strings.Contains(err.Error(), "database is locked")
}

// Path is the file of an SQLite catalog ("" for PostgreSQL).
func (db *DB) Path() string {
	if db.engine != SQLite {
		return ""
	}
	_, src, _ := EngineOf(db.url)
	return filepath.Clean(src)
}
