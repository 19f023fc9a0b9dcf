package overlay

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/ordered"
)

// pair is two chains seen through their shared ancestry: the layers each holds
// alone (own) and the layers both hold (a common suffix of both chains: a layer's
// backing file is part of the layer, so once two chains share a file they share
// everything below it).
type pair struct {
	a, b       disk.Image   // the chains; nil reads as zeros
	ownA, ownB []disk.Image // layers not shared, top first
	shared     []disk.Image // layers both hold, top first
	// The shared layers show through in a below cutA (and in b below cutB): a
	// layer reads as zeros past its own size, hiding what lies below.
	cutA, cutB int64
}

// fileKey identifies a layer's file.
type fileKey struct {
	fi   os.FileInfo
	path string
}

func layerKey(img disk.Image) fileKey { return pathKey(img.Info().Path) }

func pathKey(p string) fileKey {
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	if real, err := filepath.EvalSymlinks(p); err == nil {
		p = real
	}
	fi, _ := os.Stat(p)
	return fileKey{fi: fi, path: p}
}

// SameFile reports whether the paths a and b name one file (a backing chain may
// name a layer by another path than the store does).
func SameFile(a, b string) bool { return pathKey(a).same(pathKey(b)) }

func (k fileKey) same(o fileKey) bool {
	if k.fi != nil && o.fi != nil {
		return os.SameFile(k.fi, o.fi)
	}
	return k.path == o.path
}

// newPair finds what chains a and b share.
func newPair(a, b disk.Image) *pair {
	la, lb := layersOf(a), layersOf(b)
	ka, kb := make([]fileKey, len(la)), make([]fileKey, len(lb))
	for i, l := range la {
		ka[i] = layerKey(l)
	}
	for i, l := range lb {
		kb[i] = layerKey(l)
	}
	n := 0
	for n < len(la) && n < len(lb) && ka[len(la)-1-n].same(kb[len(lb)-1-n]) {
		n++
	}
	p := &pair{a: a, b: b, ownA: la[:len(la)-n], ownB: lb[:len(lb)-n], shared: la[len(la)-n:]}
	p.cutA, p.cutB = cut(p.ownA), cut(p.ownB)
	return p
}

func layersOf(img disk.Image) []disk.Image {
	if img == nil {
		return nil
	}
	return disk.Layers(img)
}

func cut(own []disk.Image) int64 {
	c := int64(math.MaxInt64)
	for _, l := range own {
		c = min(c, l.Size())
	}
	return c
}

// candidates lists the guest ranges inside w where a and b can read differently:
// what the layers of either chain alone allocate (data or zero), and where a size
// cut hides the shared layers in one chain but not in the other. Everything else
// is served by the same shared layer in both, or reads as zeros in both.
func (p *pair) candidates(w Range) (RangeSet, error) {
	own := append(append([]disk.Image(nil), p.ownA...), p.ownB...)
	maps := make([][]disk.Extent, len(own))
	errs := make([]error, len(own))
	var wg sync.WaitGroup
	for i, l := range own { // one goroutine per layer: mapping walks every L2 entry
		end := min(w.End(), l.Size())
		if end <= w.Off {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			maps[i], errs[i] = l.MapLayer(w.Off, end-w.Off)
		}()
	}
	wg.Wait()
	var s RangeSet
	for i, exts := range maps {
		if errs[i] != nil {
			return nil, fmt.Errorf("map %s: %w", own[i].Info().Path, errs[i])
		}
		for _, e := range exts {
			if e.State != disk.Unallocated {
				s.Add(e.Off, e.Len)
			}
		}
	}
	if len(p.shared) > 0 && p.cutA != p.cutB {
		sh := p.shared[0]
		lo := max(w.Off, min(p.cutA, p.cutB))
		hi := min(w.End(), max(p.cutA, p.cutB), sh.Size())
		if lo < hi {
			exts, err := disk.MapChain(sh, lo, hi-lo)
			if err != nil {
				return nil, fmt.Errorf("map %s: %w", sh.Info().Path, err)
			}
			for _, e := range exts {
				if e.Depth >= 0 && !e.Zero {
					s.Add(e.Off, e.Len)
				}
			}
		}
	}
	return s.Normalize(), nil
}

// Tuning of the comparison pipeline (variables so that tests can shrink them).
var (
	windowSize int64 = 1 << 30 // guest bytes mapped at a time (bounds the memory of range lists)
	chunkSize  int64 = 4 << 20 // guest bytes read and compared by one worker at a time
)

// compareStats counts the work of a comparison.
type compareStats struct {
	Candidates int64 // clusters examined (allocated by a layer that is not shared)
	Read       int64 // bytes read from either chain
}

// chunkResult is one chunk compared: the clusters that differ, with a's view.
type chunkResult struct {
	r     Range
	aData []byte // a's view of the chunk (nil when a reads as zeros throughout)
	diffs []Range
	aZero []bool // per diff: a's view of it is all zeros
	read  int64
	err   error
}

// sideMap tells, per cluster of a chunk, whether a chain maps it as zeros and which
// shared layer serves it (-1: none, or a layer the chain holds alone).
type sideMap struct {
	zero   []bool
	shared []int
}

func (p *pair) mapSide(img disk.Image, own int, r Range, g int64) (sideMap, error) {
	n := int((r.Len + g - 1) / g)
	m := sideMap{zero: make([]bool, n), shared: make([]int, n)}
	for i := range n {
		m.zero[i] = true
		m.shared[i] = -2 // not set yet
	}
	if img == nil || r.Off >= img.Size() {
		for i := range n {
			m.shared[i] = -1
		}
		return m, nil
	}
	end := min(r.End(), img.Size())
	exts, err := disk.MapChain(img, r.Off, end-r.Off)
	if err != nil {
		return m, fmt.Errorf("map %s: %w", img.Info().Path, err)
	}
	// Past the chain's end: zeros.
	exts = append(exts, disk.ChainExtent{Off: end, Len: r.End() - end, Depth: -1, Zero: true})
	for _, e := range exts {
		if e.Len <= 0 {
			continue
		}
		sh := -1
		if e.Depth >= own {
			sh = e.Depth - own
		}
		for i := (e.Off - r.Off) / g; i <= (e.Off+e.Len-1-r.Off)/g; i++ {
			if !e.Zero {
				m.zero[i] = false
			}
			switch m.shared[i] {
			case -2:
				m.shared[i] = sh
			case sh:
			default:
				m.shared[i] = -1 // mixed
			}
		}
	}
	return m, nil
}

// compareChunk reads r (aligned to g) from both chains and lists the clusters
// that differ.
func (p *pair) compareChunk(res *chunkResult, g int64, pool *sync.Pool) {
	r := res.r
	ma, err := p.mapSide(p.a, len(p.ownA), r, g)
	if err != nil {
		res.err = err
		return
	}
	mb, err := p.mapSide(p.b, len(p.ownB), r, g)
	if err != nil {
		res.err = err
		return
	}
	n := len(ma.zero)
	need := func(m, o sideMap) bool {
		for i := range n {
			if !m.zero[i] && !(m.shared[i] >= 0 && m.shared[i] == o.shared[i]) {
				return true
			}
		}
		return false
	}
	var bufA, bufB []byte
	if need(ma, mb) {
		bufA = pool.Get().([]byte)[:r.Len]
		if err := disk.ReadView(p.a, bufA, r.Off); err != nil {
			res.err = err
			return
		}
		res.read += r.Len
		res.aData = bufA
	}
	if need(mb, ma) {
		bufB = pool.Get().([]byte)[:r.Len]
		defer pool.Put(bufB[:cap(bufB)])
		if err := disk.ReadView(p.b, bufB, r.Off); err != nil {
			res.err = err
			return
		}
		res.read += r.Len
	}
	for i := range n {
		lo := int64(i) * g
		hi := min(lo+g, r.Len)
		if ma.zero[i] && mb.zero[i] {
			continue
		}
		if ma.shared[i] >= 0 && ma.shared[i] == mb.shared[i] {
			continue // the same layer serves both
		}
		var da, db []byte
		if !ma.zero[i] {
			da = bufA[lo:hi]
		}
		if !mb.zero[i] {
			db = bufB[lo:hi]
		}
		var same, aZero bool
		switch {
		case da == nil:
			same, aZero = isZero(db), true
		case db == nil:
			aZero = isZero(da)
			same = aZero
		default:
			same = bytes.Equal(da, db)
			aZero = !same && isZero(da)
		}
		if !same {
			res.diffs = append(res.diffs, Range{r.Off + lo, hi - lo})
			res.aZero = append(res.aZero, aZero)
		}
	}
}

// compare walks every candidate cluster of [0, limit) at granularity g with
// parallel readers and calls emit, in guest order, once per chunk that has
// differing clusters. skip, when not nil, returns what to remove from the
// candidates of a window (a rebase skips what the top allocates); it is asked
// only about the candidate ranges. emit must not keep aData.
func (p *pair) compare(ctx context.Context, g, limit int64, skip func(cands RangeSet) (RangeSet, error),
	emit func(res *chunkResult) error) (compareStats, error) {
	var st compareStats
	workers := min(4, max(2, runtime.GOMAXPROCS(0)))
	chunk := max(g, chunkSize/g*g)
	pool := &sync.Pool{New: func() any { return make([]byte, chunk) }}

	err := ordered.Run(ctx, workers, workers*2,
		func(ctx context.Context, submit func(*chunkResult, bool) error) error {
			for w := int64(0); w < limit; w += windowSize {
				win := Range{w, min(windowSize, limit-w)}
				cands, err := p.candidates(win)
				if err == nil && skip != nil && len(cands) > 0 {
					var sk RangeSet
					if sk, err = skip(cands); err == nil {
						cands = cands.Subtract(sk.Normalize())
					}
				}
				if err != nil {
					return err
				}
				for _, c := range cands.Align(g, win.Off, win.End()) {
					for off := c.Off; off < c.End(); off += chunk {
						if err := submit(&chunkResult{r: Range{off, min(chunk, c.End()-off)}}, false); err != nil {
							return err
						}
					}
				}
			}
			return nil
		},
		func(res *chunkResult) { p.compareChunk(res, g, pool) },
		func(res *chunkResult) error {
			defer func() {
				if res.aData != nil {
					pool.Put(res.aData[:cap(res.aData)])
				}
			}()
			if res.err != nil {
				return res.err
			}
			st.Candidates += (res.r.Len + g - 1) / g
			st.Read += res.read
			if len(res.diffs) > 0 {
				return emit(res)
			}
			return nil
		})
	return st, err
}
