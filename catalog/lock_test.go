package catalog

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestLocks(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		a := mustOpen(t, url, Options{})
		b := mustOpen(t, url, Options{}) // another process of the site
		steps := []struct {
			db     *DB
			key    string
			shared bool
			want   error // nil: taken
		}{
			{a, "checkin/1", false, nil},
			{b, "checkin/1", false, ErrLocked},
			{b, "checkin/1", true, ErrLocked},
			{a, "checkin/1", false, ErrLocked}, // a second holder in the same process
			{a, "checkin/1", true, ErrLocked},
			{b, "checkin/2", false, nil}, // other keys are free
			{a, "layer/x", true, nil},
			{b, "layer/x", true, nil}, // shared with shared
			{a, "layer/x", true, nil},
			{b, "layer/x", false, ErrLocked},
			{a, "layer/x", false, ErrLocked},
		}
		var releases []func()
		for i, st := range steps {
			rel, err := st.db.TryLock(st.key, st.shared)
			if !errors.Is(err, st.want) || (st.want == nil) != (err == nil) {
				t.Fatalf("step %d: TryLock(%s, shared %v) = %v, want %v", i, st.key, st.shared, err, st.want)
			}
			if rel != nil {
				releases = append(releases, rel)
			}
		}
		for _, rel := range releases {
			rel()
			rel() // twice is once
		}
		for _, db := range []*DB{b, a} {
			rel, err := db.TryLock("layer/x", false)
			if err != nil {
				t.Fatalf("after every release: %v", err)
			}
			rel()
		}
		// Lock waits for the holder.
		rel, err := a.TryLock("index", false)
		if err != nil {
			t.Fatal(err)
		}
		go func() { time.Sleep(100 * time.Millisecond); rel() }()
		t0 := time.Now()
		rel2, err := b.Lock(context.Background(), "index", false)
		if err != nil {
			t.Fatal(err)
		}
		if time.Since(t0) < 90*time.Millisecond {
			t.Errorf("Lock took %v while another process held the lock for 100 ms", time.Since(t0))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if _, err := a.Lock(ctx, "index", true); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Lock with a context that ends: %v", err)
		}
		rel2()
		// Closing a DB gives its locks back.
		if _, err := b.TryLock("closed", false); err != nil {
			t.Fatal(err)
		}
		b.Close()
		if rel, err := a.TryLock("closed", false); err != nil {
			t.Errorf("after the holder closed its catalog: %v", err)
		} else {
			rel()
		}
	})
}

// TestLockHelperProcess holds a lock for TestLocksOfKilledProcess.
func TestLockHelperProcess(t *testing.T) {
	url := os.Getenv("CVD_LOCK_HELPER_URL")
	if url == "" {
		t.Skip("a helper of TestLocksOfKilledProcess")
	}
	db, err := Open(url, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.TryLock("held-by-helper", false); err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("locked\n")
	time.Sleep(time.Minute)
}

func TestLocksOfKilledProcess(t *testing.T) {
	forEngines(t, func(t *testing.T, url string) {
		db := mustOpen(t, url, Options{})
		cmd := exec.Command(os.Args[0], "-test.run", "^TestLockHelperProcess$")
		cmd.Env = append(os.Environ(), "CVD_LOCK_HELPER_URL="+url)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Process.Kill()
		line, err := bufio.NewReader(out).ReadString('\n')
		if err != nil || line != "locked\n" {
			t.Fatalf("helper: %q %v", line, err)
		}
		if _, err := db.TryLock("held-by-helper", true); !errors.Is(err, ErrLocked) {
			t.Fatalf("lock held by a live process: %v", err)
		}
		cmd.Process.Kill()
		cmd.Wait()
		// PostgreSQL notices the closed connection within moments.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		rel, err := db.Lock(ctx, "held-by-helper", false)
		if err != nil {
			t.Fatalf("lock of a killed process: %v", err)
		}
		rel()
	})
}
