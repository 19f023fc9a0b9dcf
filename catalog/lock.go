package catalog

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrLocked: TryLock found the lock held by another holder (of this process or
// of another process of the catalog).
var ErrLocked = errors.New("held by another process or request")

// Site-wide advisory locks. Every process that opens one catalog shares them:
// PostgreSQL's session advisory locks (on one connection per DB, so that a
// killed process's locks go with its connection), or for SQLite byte-range
// locks (open file description locks, released when the process dies) on the
// file <catalog>.locks beside the catalog. Holders in one process are counted
// in memory: a key is locked at the engine once per process.
//
// A lock is exclusive or shared. The key is any string ("checkin/<id>",
// "layer/<id>", "index"); it is hashed to the engine's 64-bit lock space.
type locks struct {
	mu   sync.Mutex
	held map[string]*holders
	conn *sql.Conn // PostgreSQL: the connection holding this process's locks
	file *os.File  // SQLite: the lock file
}

type holders struct {
	shared int
	excl   bool
}

// lockKey is the engine's number for key.
func lockKey(key string) int64 {
	h := fnv.New64a()
	h.Write([]byte("cvd-lock:"))
	h.Write([]byte(key))
	// Non-negative and below 2^62: a valid file offset, and clear of the
	// writers' lock and goose's.
	return int64(h.Sum64() >> 2)
}

// TryLock takes the lock named key (shared or exclusive) when no other holder
// conflicts with it, else it returns ErrLocked at once. release gives it back;
// a process that dies gives back its locks.
func (db *DB) TryLock(key string, shared bool) (release func(), err error) {
	l := &db.locks
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.held == nil {
		l.held = map[string]*holders{}
	}
	h := l.held[key]
	if h != nil && (h.excl || !shared) {
		return nil, fmt.Errorf("lock %s: %w", key, ErrLocked)
	}
	if h == nil {
		if err := db.engineLock(key, shared); err != nil {
			return nil, err
		}
		h = &holders{}
		l.held[key] = h
	}
	if shared {
		h.shared++
	} else {
		h.excl = true
	}
	var once sync.Once
	return func() { once.Do(func() { db.unlock(key, shared) }) }, nil
}

// Lock waits until TryLock succeeds or ctx ends.
func (db *DB) Lock(ctx context.Context, key string, shared bool) (release func(), err error) {
	wait := time.Millisecond
	for {
		release, err := db.TryLock(key, shared)
		if !errors.Is(err, ErrLocked) {
			return release, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for lock %s: %w", key, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 50*time.Millisecond)
	}
}

func (db *DB) unlock(key string, shared bool) {
	l := &db.locks
	l.mu.Lock()
	defer l.mu.Unlock()
	h := l.held[key]
	if h == nil {
		return
	}
	if shared {
		h.shared--
	} else {
		h.excl = false
	}
	if h.shared > 0 || h.excl {
		return
	}
	delete(l.held, key)
	if err := db.engineUnlock(key, shared); err != nil {
		// The lock stays with the engine until the connection or the
		// process goes; drop the connection so that it goes now.
		db.dropLockConn()
	}
}

// engineLock takes key at the engine for this process; the caller holds l.mu.
func (db *DB) engineLock(key string, shared bool) error {
	k := lockKey(key)
	switch db.engine {
	case Postgres:
		conn, err := db.lockConn()
		if err != nil {
			return err
		}
		fn := "pg_try_advisory_lock"
		if shared {
			fn = "pg_try_advisory_lock_shared"
		}
		var ok bool
		if err := conn.QueryRowContext(db.ctx, "SELECT "+fn+"($1)", k).Scan(&ok); err != nil {
			db.dropLockConn()
			return fmt.Errorf("catalog: lock %s: %w", key, err)
		}
		if !ok {
			return fmt.Errorf("lock %s: %w", key, ErrLocked)
		}
		return nil
	default:
		f, err := db.lockFile()
		if err != nil {
			return err
		}
		typ := int16(unix.F_WRLCK)
		if shared {
			typ = unix.F_RDLCK
		}
		lk := unix.Flock_t{Type: typ, Whence: 0, Start: k, Len: 1}
		if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
				return fmt.Errorf("lock %s: %w", key, ErrLocked)
			}
			return fmt.Errorf("catalog: lock %s: %w", key, err)
		}
		return nil
	}
}

func (db *DB) engineUnlock(key string, shared bool) error {
	k := lockKey(key)
	switch db.engine {
	case Postgres:
		conn := db.locks.conn
		if conn == nil {
			return nil
		}
		fn := "pg_advisory_unlock"
		if shared {
			fn = "pg_advisory_unlock_shared"
		}
		var ok bool
		return conn.QueryRowContext(context.Background(), "SELECT "+fn+"($1)", k).Scan(&ok)
	default:
		if db.locks.file == nil {
			return nil
		}
		lk := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: k, Len: 1}
		return unix.FcntlFlock(db.locks.file.Fd(), unix.F_OFD_SETLK, &lk)
	}
}

func (db *DB) lockConn() (*sql.Conn, error) {
	if db.locks.conn != nil {
		return db.locks.conn, nil
	}
	// Its own pool: a connection held for the life of the process must not
	// take one of the pool that transactions share.
	if db.lockDB == nil {
		_, src, _ := EngineOf(db.url)
		p, err := sql.Open("pgx", src)
		if err != nil {
			return nil, err
		}
		p.SetMaxOpenConns(1)
		db.lockDB = p
	}
	c, err := db.lockDB.Conn(db.ctx)
	if err != nil {
		return nil, fmt.Errorf("catalog: connection for locks: %w", err)
	}
	db.locks.conn = c
	return c, nil
}

// dropLockConn closes the locks' connection, and with it the engine's locks of
// this process: the holders counted in memory keep excluding one another here,
// but another process may take their keys until they are released and taken
// again. The next lock opens a new connection.
func (db *DB) dropLockConn() {
	if db.locks.conn != nil {
		db.locks.conn.Raw(func(any) error { return driver.ErrBadConn })
		db.locks.conn.Close()
		db.locks.conn = nil
	}
}

func (db *DB) lockFile() (*os.File, error) {
	if db.locks.file != nil {
		return db.locks.file, nil
	}
	p := db.Path() + ".locks"
	flag := os.O_RDWR | os.O_CREATE
	if db.readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(p, flag, 0o600)
	if err != nil {
		return nil, fmt.Errorf("catalog: lock file: %w", err)
	}
	db.locks.file = f
	return f, nil
}

// closeLocks gives back every lock of this process. On PostgreSQL they are
// released explicitly before the connection closes: a closed connection's
// backend releases them only when the server has seen the disconnect, which
// another process may try to take them before.
func (db *DB) closeLocks() {
	db.locks.mu.Lock()
	defer db.locks.mu.Unlock()
	if db.locks.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		db.locks.conn.ExecContext(ctx, "SELECT pg_advisory_unlock_all()")
		cancel()
		db.locks.conn.Close()
		db.locks.conn = nil
	}
	if db.lockDB != nil {
		db.lockDB.Close()
		db.lockDB = nil
	}
	if db.locks.file != nil {
		db.locks.file.Close()
		db.locks.file = nil
	}
	db.locks.held = nil
}
