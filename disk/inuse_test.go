package disk

import (
	"errors"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cvd-project/cvd/internal/testutil"
)

// TestInUse: an image that qemu-io holds open is in use (QEMU's locks), the
// same image after qemu-io exits is not, and cvd's own open of it takes no lock
// that QEMU would see.
func TestInUse(t *testing.T) {
	testutil.NeedQemu(t)
	p := filepath.Join(t.TempDir(), "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
	if busy, err := InUse(p); err != nil || busy {
		t.Fatalf("a closed image: in use %v, %v", busy, err)
	}
	img, err := Open(p, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if busy, _ := InUse(p); busy {
		t.Error("cvd's own open shows as in use")
	}
	img.Close()
	for _, ro := range []bool{false, true} {
		args := []string{"-f", "qcow2"}
		if ro {
			args = append(args, "-r")
		}
		q := exec.Command("qemu-io", append(args, p)...)
		stdin, _ := q.StdinPipe()
		if err := q.Start(); err != nil {
			t.Fatal(err)
		}
		var busy bool
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if busy, _ = InUse(p); busy {
				break
			}
		}
		if !busy {
			t.Errorf("qemu-io (read-only %v) holds the image: not seen as in use", ro)
		}
		if err := CheckNotInUse(p); !errors.Is(err, ErrInUse) {
			t.Errorf("CheckNotInUse while qemu-io holds it: %v", err)
		}
		stdin.Close()
		q.Wait()
		if busy, _ := InUse(p); busy {
			t.Errorf("in use after qemu-io exited")
		}
	}
}
