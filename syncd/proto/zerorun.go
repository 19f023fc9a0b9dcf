package proto

// ZeroRun joins zero clusters that follow one another into runs, and hands
// each run to Write once it ends (a cluster elsewhere, a data cluster, Flush):
// one zero frame, or one WriteZeroes, per run rather than per cluster.
type ZeroRun struct {
	Start, Len int64
	Write      func(start, n int64) error
}

// Add adds n zero clusters from idx on.
func (z *ZeroRun) Add(idx, n int64) error {
	if z.Len > 0 && z.Start+z.Len == idx {
		z.Len += n
		return nil
	}
	if err := z.Flush(); err != nil {
		return err
	}
	z.Start, z.Len = idx, n
	return nil
}

// Flush writes the run held, if any.
func (z *ZeroRun) Flush() error {
	if z.Len == 0 {
		return nil
	}
	n := z.Len
	z.Len = 0
	return z.Write(z.Start, n)
}
