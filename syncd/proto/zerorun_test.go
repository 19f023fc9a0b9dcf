package proto

import (
	"fmt"
	"testing"
)

func TestZeroRun(t *testing.T) {
	for _, c := range []struct {
		adds [][2]int64 // idx, n
		want string     // the runs written, in order
	}{
		{nil, "[]"},
		{[][2]int64{{3, 1}}, "[3+1]"},
		{[][2]int64{{3, 1}, {4, 1}, {5, 2}}, "[3+4]"},
		{[][2]int64{{3, 1}, {5, 1}, {6, 3}, {10, 1}}, "[3+1 5+4 10+1]"},
		{[][2]int64{{0, 5}, {5, 5}}, "[0+10]"},
	} {
		var runs []string
		z := ZeroRun{Write: func(start, n int64) error { runs = append(runs, fmt.Sprintf("%d+%d", start, n)); return nil }}
		for _, a := range c.adds {
			if err := z.Add(a[0], a[1]); err != nil {
				t.Fatal(err)
			}
		}
		if err := z.Flush(); err != nil {
			t.Fatal(err)
		}
		z.Flush() // a second flush writes nothing
		if got := fmt.Sprint(runs); got != c.want && !(c.want == "[]" && runs == nil) {
			t.Errorf("adds %v: runs %s, want %s", c.adds, got, c.want)
		}
	}
}
