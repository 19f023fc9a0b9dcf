package proto

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/internal/testutil"
)

// seedStream is a well-formed cluster stream: a compressed and a raw data frame,
// a zero run, a reference and the end frame.
func seedStream(t testing.TB) []byte {
	var b bytes.Buffer
	sw := NewStreamWriter(&b)
	for i, raw := range [][]byte{testutil.Fill(1, 4096, true), testutil.Fill(2, 4096, false)} {
		ec, err := EncodeCluster(0, int64(i), raw, nil, EncodeOptions{Compress: true})
		if err != nil {
			t.Fatal(err)
		}
		sw.Data(ec)
	}
	sw.Zeros(0, 2, 3)
	ref := testutil.Fill(3, 4096, false)
	ec, err := EncodeCluster(1, 5, ref, nil, EncodeOptions{RefOf: func(Digest) (ClusterRef, bool) {
		return ClusterRef{Layer: "ab" + string(bytes.Repeat([]byte("0"), 62)), Index: 9}, true
	}})
	if err != nil {
		t.Fatal(err)
	}
	sw.Reference(ec)
	sw.End(4, make([]byte, sha256.Size))
	if err := sw.Flush(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// fuzzDst is the clusters' decoding buffer, one for every input (a fuzz worker
// runs one input at a time).
var fuzzDst = make([]byte, 0, MaxClusterSize)

// FuzzStream feeds arbitrary bytes to the cluster stream's reader and decoder:
// they never panic, never read a payload beyond the largest cluster, and any
// cluster they hand out hashes to its digest.
func FuzzStream(f *testing.F) {
	good := seedStream(f)
	f.Add(good)
	f.Add(good[:len(good)-7])
	f.Add([]byte(streamMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		sr := NewStreamReader(bytes.NewReader(data))
		var payload []byte
		dst := fuzzDst[:0]
		for range 64 {
			fr, d, p, err := sr.Next(payload)
			if err != nil {
				if !errors.Is(err, ErrStream) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("error %v is not a stream error", err)
				}
				return
			}
			if len(p) > MaxClusterSize+RefBody {
				t.Fatalf("payload of %d bytes", len(p))
			}
			payload = p
			switch fr.Kind {
			case KindEnd:
				return
			case KindData:
				raw, err := DecodeCluster(fr, d, p, dst[:0])
				if err == nil && sha256.Sum256(raw) != d {
					t.Fatalf("cluster %d decoded without matching its digest", fr.Idx)
				}
			}
		}
	})
}

var errNoLayers = errors.New("no layers here")

// FuzzDecodeOrdered runs the parallel decoder on arbitrary bytes: it ends (with
// an error or the end frame), and each cluster it hands out matches its digest.
func FuzzDecodeOrdered(f *testing.F) {
	good := seedStream(f)
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Fuzz(func(t *testing.T, data []byte) {
		sr := NewStreamReader(bytes.NewReader(data))
		resolve := func(Frame, Digest, []byte, []byte) ([]byte, error) { return nil, errNoLayers }
		_, _, err := DecodeOrdered(context.Background(), sr, true, resolve, func(Frame, Digest) error { return nil },
			func(fr Frame, d Digest, raw []byte) error {
				if raw != nil && sha256.Sum256(raw) != d {
					t.Fatalf("cluster %d handed out without matching its digest", fr.Idx)
				}
				return nil
			})
		if err != nil && !errors.Is(err, ErrStream) && !errors.Is(err, ErrDigestMismatch) &&
			!errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) &&
			!errors.Is(err, errNoLayers) {
			t.Fatalf("error %v is neither a stream error nor the resolver's", err)
		}
	})
}

// FuzzEntries: a list ReadEntries accepts has the declared count of entries in
// ascending order, and encodes back to the same bytes.
func FuzzEntries(f *testing.F) {
	var list []byte
	for _, e := range []Entry{{Index: 1, Digest: Digest{1}}, {Index: 4, Zero: true}, {Index: 9, Digest: Digest{9}}} {
		list = AppendEntry(list, e)
	}
	f.Add(list, int64(3), int64(16), true)
	f.Add(list[:20], int64(3), int64(16), false)
	f.Fuzz(func(t *testing.T, data []byte, want, clusters int64, zeroOK bool) {
		var back []byte
		prev := int64(-1)
		n := int64(0)
		err := ReadEntries(bytes.NewReader(data), want, clusters, zeroOK, func(e Entry) error {
			if e.Index <= prev || e.Index >= clusters || (e.Zero && !zeroOK) {
				t.Fatalf("entry %+v accepted after %d (clusters %d, zeroOK %v)", e, prev, clusters, zeroOK)
			}
			prev = e.Index
			n++
			back = AppendEntry(back, e)
			return nil
		})
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error %v is not a bad request", err)
			}
			return
		}
		if n != want || !bytes.Equal(back, data) {
			t.Fatalf("accepted %d entries (declared %d); re-encoded equal: %v", n, want, bytes.Equal(back, data))
		}
	})
}

// FuzzMissing: a missing list ReadMissing accepts encodes back to the same bytes.
func FuzzMissing(f *testing.F) {
	f.Add(AppendMissing(AppendMissing(nil, MissingItem{Disk: 0, Index: 3, Digest: Digest{3}}), MissingItem{Disk: 1, Index: 7}))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, data []byte) {
		var back []byte
		err := ReadMissing(bytes.NewReader(data), func(m MissingItem) error {
			back = AppendMissing(back, m)
			return nil
		})
		if err != nil {
			if !errors.Is(err, ErrStream) {
				t.Fatalf("error %v is not a stream error", err)
			}
			return
		}
		if !bytes.Equal(back, data) {
			t.Fatal("a missing list does not encode back to its bytes")
		}
	})
}

// FuzzBundleHeader: ReadBundleHeader on arbitrary bytes never panics, answers
// only ErrBadRequest, and what it accepts promises no negative or impossible
// amount of data.
func FuzzBundleHeader(f *testing.F) {
	h := BundleHeader{Desktop: "desk", Version: 3, Layers: []LayerInfo{{ID: strings.Repeat("ab", 32), Size: 1 << 30,
		ClusterSize: 65536}}}
	h.Layers[0].Clusters, h.Layers[0].DataClusters, h.Layers[0].DataBytes = 16384, 10, 655360
	hb, _ := json.Marshal(&h)
	good := binary.BigEndian.AppendUint32([]byte(BundleMagic), uint32(len(hb)))
	good = append(good, hb...)
	f.Add(good)
	f.Add(good[:20])
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ReadBundleHeader(bufio.NewReader(bytes.NewReader(data)))
		if err != nil {
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("error %v is not a bad request", err)
			}
			return
		}
		for _, li := range h.Layers {
			if li.DataBytes < 0 || li.DataClusters > li.Clusters || li.DataBytes > li.DataClusters*int64(li.ClusterSize) {
				t.Fatalf("accepted layer %+v", li)
			}
		}
	})
}
