package catalog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/internal/testutil"
)

// engines opens a fresh catalog on each engine; the suite runs on both.
func engines(t *testing.T) map[string]func(t *testing.T) string {
	return map[string]func(t *testing.T) string{
		SQLite:   func(t *testing.T) string { return filepath.Join(t.TempDir(), "catalog.db") },
		Postgres: func(t *testing.T) string { return testutil.Postgres(t) },
	}
}

func forEngines(t *testing.T, fn func(t *testing.T, url string)) {
	for name, mk := range engines(t) {
		t.Run(name, func(t *testing.T) { fn(t, mk(t)) })
	}
}

func mustOpen(t *testing.T, url string, opts Options) *DB {
	t.Helper()
	db, err := Open(url, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func TestRecords(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		db := mustOpen(t, url, Options{})
		b := []byte("things")
		err := db.Update(func(tx *Tx) error {
			bk := tx.Bucket(b)
			for _, k := range []string{"b", "a", "c\x00x", "c", "\xff"} {
				if err := bk.Put([]byte(k), []byte("v"+k)); err != nil {
					return err
				}
			}
			if err := bk.Put([]byte("empty"), nil); err != nil {
				return err
			}
			return tx.Bucket([]byte("other")).Put([]byte("a"), []byte("other"))
		})
		if err != nil {
			t.Fatal(err)
		}
		err = db.View(func(tx *Tx) error {
			bk := tx.Bucket(b)
			if got := bk.Get([]byte("a")); string(got) != "va" {
				t.Errorf("get a = %q", got)
			}
			if got := bk.Get([]byte("empty")); got == nil || len(got) != 0 {
				t.Errorf("get of an empty value = %#v, want an empty non-nil slice", got)
			}
			if got := bk.Get([]byte("missing")); got != nil {
				t.Errorf("get missing = %q", got)
			}
			var keys []string
			bk.ForEach(func(k, v []byte) error { keys = append(keys, string(k)); return nil })
			want := []string{"a", "b", "c", "c\x00x", "empty", "\xff"}
			if fmt.Sprint(keys) != fmt.Sprint(want) {
				t.Errorf("keys %q, want %q (byte order)", keys, want)
			}
			c := bk.Cursor()
			var pre []string
			for k, _ := c.Seek([]byte("c")); k != nil && bytes.HasPrefix(k, []byte("c")); k, _ = c.Next() {
				pre = append(pre, string(k))
			}
			if fmt.Sprint(pre) != fmt.Sprint([]string{"c", "c\x00x"}) {
				t.Errorf("prefix scan %q", pre)
			}
			if n, err := bk.Len(); err != nil || n != 6 {
				t.Errorf("len %d, %v", n, err)
			}
			if err := bk.Put([]byte("x"), nil); !errors.Is(err, ErrReadOnly) {
				t.Errorf("put in a read transaction: %v", err)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		// A failed transaction changes nothing.
		boom := errors.New("boom")
		err = db.Update(func(tx *Tx) error {
			tx.Bucket(b).Delete([]byte("a"))
			tx.Bucket(b).Put([]byte("z"), []byte("z"))
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatal(err)
		}
		db.View(func(tx *Tx) error {
			if tx.Bucket(b).Get([]byte("a")) == nil || tx.Bucket(b).Get([]byte("z")) != nil {
				t.Error("a rolled-back transaction left changes")
			}
			return nil
		})
	})
}

func TestCursorPages(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		db := mustOpen(t, url, Options{})
		const n = cursorPage*2 + 7
		err := db.Update(func(tx *Tx) error {
			for i := 0; i < n; i++ {
				if err := tx.Bucket([]byte("p")).Put([]byte(fmt.Sprintf("%06d", i)), []byte{byte(i)}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		i := 0
		err = db.View(func(tx *Tx) error {
			return tx.Bucket([]byte("p")).ForEach(func(k, v []byte) error {
				if string(k) != fmt.Sprintf("%06d", i) || v[0] != byte(i) {
					return fmt.Errorf("record %d is %q", i, k)
				}
				i++
				return nil
			})
		})
		if err != nil || i != n {
			t.Fatalf("walked %d of %d: %v", i, n, err)
		}
	})
}

func TestSequences(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		db := mustOpen(t, url, Options{})
		var got []uint64
		for i := 0; i < 3; i++ {
			err := db.Update(func(tx *Tx) error {
				n, err := tx.Bucket([]byte("s")).NextSequence()
				got = append(got, n)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		if fmt.Sprint(got) != "[1 2 3]" {
			t.Errorf("sequence %v", got)
		}
	})
}

// Writers of two handles (as of two processes) are serialized: concurrent
// read-modify-write increments lose nothing.
func TestWritersSerialized(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		a := mustOpen(t, url, Options{})
		b := mustOpen(t, url, Options{})
		const per = 40
		var wg sync.WaitGroup
		errs := make(chan error, 2*per)
		for _, db := range []*DB{a, b} {
			for w := 0; w < 2; w++ {
				wg.Add(1)
				go func(db *DB) {
					defer wg.Done()
					for i := 0; i < per/2; i++ {
						errs <- db.Update(func(tx *Tx) error {
							bk := tx.Bucket([]byte("c"))
							v := bk.Get([]byte("n"))
							var n int
							fmt.Sscan(string(v), &n)
							return bk.Put([]byte("n"), []byte(fmt.Sprint(n+1)))
						})
					}
				}(db)
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		a.View(func(tx *Tx) error {
			if got := string(tx.Bucket([]byte("c")).Get([]byte("n"))); got != fmt.Sprint(2*per) {
				t.Errorf("counter %s, want %d", got, 2*per)
			}
			return nil
		})
	})
}

// A reader is not blocked by a writer that holds its transaction open, and sees
// the state from before it.
func TestReadersDoNotWait(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		w := mustOpen(t, url, Options{})
		r := mustOpen(t, url, Options{})
		w.Update(func(tx *Tx) error { return tx.Bucket([]byte("x")).Put([]byte("k"), []byte("old")) })
		inTx, release := make(chan struct{}), make(chan struct{})
		done := make(chan error)
		go func() {
			done <- w.Update(func(tx *Tx) error {
				tx.Bucket([]byte("x")).Put([]byte("k"), []byte("new"))
				close(inTx)
				<-release
				return nil
			})
		}()
		<-inTx
		start := time.Now()
		err := r.View(func(tx *Tx) error {
			if got := string(tx.Bucket([]byte("x")).Get([]byte("k"))); got != "old" {
				t.Errorf("reader saw %q during the write", got)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("reader waited %v for a writer", d)
		}
		// A second writer waits, and gives up when its context is cancelled.
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		err = r.UpdateContext(ctx, func(tx *Tx) error { return nil })
		if err == nil || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("second writer while the first holds the lock: %v, want a cancelled wait", err)
		}
		close(release)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		r.View(func(tx *Tx) error {
			if got := string(tx.Bucket([]byte("x")).Get([]byte("k"))); got != "new" {
				t.Errorf("after the commit the reader sees %q", got)
			}
			return nil
		})
	})
}

func TestReadOnly(t *testing.T) {
	if _, err := Open(filepath.Join(t.TempDir(), "none.db"), Options{ReadOnly: true}); !errors.Is(err, ErrNotExist) {
		t.Errorf("read-only open of a missing catalog: %v", err)
	}
	forEngines(t, func(t *testing.T, url string) {
		mustOpen(t, url, Options{}).Close()
		ro := mustOpen(t, url, Options{ReadOnly: true})
		if err := ro.Update(func(tx *Tx) error { return nil }); !errors.Is(err, ErrReadOnly) {
			t.Errorf("update on a read-only catalog: %v", err)
		}
	})
}

func TestEngineOf(t *testing.T) {
	tests := []struct {
		name, url, engine string
		bad               bool
	}{
		{"path", "/srv/cvd/catalog.db", SQLite, false},
		{"sqlite prefix", "sqlite:/srv/catalog.db", SQLite, false},
		{"postgres", "postgres://cvd@db/cvd", Postgres, false},
		{"postgresql", "postgresql://cvd@db/cvd", Postgres, false},
		{"other scheme", "mysql://x", "", true},
		{"query in path", "/x/c.db?mode=ro", "", true},
		{"empty", "", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, _, err := EngineOf(tt.url)
			if (err != nil) != tt.bad || e != tt.engine {
				t.Errorf("EngineOf(%q) = %q, %v", tt.url, e, err)
			}
		})
	}
}

// TestKeysWith: the keys of the records that hold a value, in key order, in that
// bucket only.
func TestKeysWith(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		db := mustOpen(t, url, Options{})
		err := db.Update(func(tx *Tx) error {
			for k, v := range map[string]string{"os:2": "L1", "os:1": "L1", "web:1": "L2", "os:\xff": "L1"} {
				if err := tx.Bucket([]byte("names")).Put([]byte(k), []byte(v)); err != nil {
					return err
				}
			}
			return tx.Bucket([]byte("other")).Put([]byte("x"), []byte("L1"))
		})
		if err != nil {
			t.Fatal(err)
		}
		tests := []struct {
			value string
			want  []string
		}{
			{"L1", []string{"os:1", "os:2", "os:\xff"}},
			{"L2", []string{"web:1"}},
			{"L3", nil},
		}
		for _, tt := range tests {
			var got []string
			err := db.View(func(tx *Tx) error {
				keys, err := tx.Bucket([]byte("names")).KeysWith([]byte(tt.value))
				for _, k := range keys {
					got = append(got, string(k))
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("KeysWith(%s) = %q, want %q", tt.value, got, tt.want)
			}
		}
	})
}

// TestOnCommit: a transaction's commit hooks run once it committed, never when
// it rolled back.
func TestOnCommit(t *testing.T) {
	db := mustOpen(t, filepath.Join(t.TempDir(), "catalog.db"), Options{})
	tests := []struct {
		name string
		fail error
		want bool
	}{
		{"committed", nil, true},
		{"rolled back", errors.New("no"), false},
	}
	for _, tt := range tests {
		ran := false
		err := db.Update(func(tx *Tx) error {
			tx.OnCommit(func() { ran = true })
			if err := tx.Bucket([]byte("b")).Put([]byte("k"), []byte(tt.name)); err != nil {
				return err
			}
			return tt.fail
		})
		if (err == nil) != (tt.fail == nil) || ran != tt.want {
			t.Errorf("%s: err %v, hook ran %v", tt.name, err, ran)
		}
	}
}

// TestBatchWrites: PutAll sets every record (the last of one key wins) across
// statements; PutAllIfAbsent sets only new keys and counts them.
func TestBatchWrites(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		db := mustOpen(t, url, Options{})
		var recs []Record
		for i := range 700 { // more than one statement's worth
			recs = append(recs, Record{K: []byte(fmt.Sprintf("k%04d", i)), V: []byte("a")})
		}
		recs = append(recs, Record{K: []byte("k0003"), V: []byte("last")})
		var n1, n2 int
		err := db.Update(func(tx *Tx) error {
			b := tx.Bucket([]byte("b"))
			if err := b.PutAll(recs); err != nil {
				return err
			}
			var err error
			more := []Record{{K: []byte("k0001"), V: []byte("taken")}, {K: []byte("new1"), V: []byte("n")}, {K: []byte("new2")}}
			if n1, err = b.PutAllIfAbsent(more); err != nil {
				return err
			}
			n2, err = b.PutAllIfAbsent(nil)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if n1 != 2 || n2 != 0 {
			t.Errorf("PutAllIfAbsent set %d and %d records, want 2 and 0", n1, n2)
		}
		err = db.View(func(tx *Tx) error {
			b := tx.Bucket([]byte("b"))
			n, err := b.Len()
			for k, want := range map[string]string{"k0003": "last", "k0001": "a", "k0699": "a", "new1": "n", "new2": ""} {
				if got := b.Get([]byte(k)); got == nil || string(got) != want {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
			if n != 702 {
				t.Errorf("%d records, want 702", n)
			}
			var keys [][]byte
			for i := range 600 { // more than one query's worth, a missing key and a repeated one
				keys = append(keys, []byte(fmt.Sprintf("k%04d", i*2)))
			}
			keys = append(keys, []byte("k0003"), []byte("k0003"), []byte("none"))
			vals, gerr := b.GetAll(keys)
			if gerr != nil {
				return gerr
			}
			for i, k := range keys {
				if want := b.Get(k); !bytes.Equal(vals[i], want) || (want == nil) != (vals[i] == nil) {
					t.Errorf("GetAll: %s = %q, Get says %q", k, vals[i], want)
				}
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

// TestFullDisk: with the file system of an SQLite catalog full, writes fail
// with an error that says so (syscall.ENOSPC) and change nothing; once there is
// room again, the same open catalog writes (no reopen, no restart).
func TestFullDisk(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "fs")
	os.MkdirAll(dir, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", dir).CombinedOutput(); err != nil {
		if testutil.Required("root") {
			t.Fatalf("mount tmpfs: %v %s", err, out)
		}
		t.Skipf("cannot mount a tmpfs (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	db := mustOpen(t, filepath.Join(dir, "catalog.db"), Options{})
	b := []byte("things")
	big := bytes.Repeat([]byte("x"), 256<<10)
	put := func(k string) error {
		return db.Update(func(tx *Tx) error { return tx.Bucket(b).Put([]byte(k), big) })
	}
	if err := put("before"); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	for buf := make([]byte, 1<<20); ; {
		if _, err := f.Write(buf); err != nil {
			break
		}
	}
	f.Close()
	for i := range 3 {
		if err := put(fmt.Sprint("full", i)); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("write %d on a full disk: %v, want ENOSPC", i, err)
		}
	}
	os.Remove(filler)
	for i := range 3 {
		if err := put(fmt.Sprint("after", i)); err != nil {
			t.Fatalf("write %d once there is room: %v", i, err)
		}
	}
	db.View(func(tx *Tx) error {
		n, _ := tx.Bucket(b).Len()
		if n != 4 {
			t.Errorf("%d records, want 4 (one before, three after)", n)
		}
		return nil
	})
}
