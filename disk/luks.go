package disk

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/google/uuid"
)

// LUKS1 as QEMU embeds it in a qcow2 file (crypt_method 2): the full-disk-crypto
// header extension names a cluster-aligned region of the file that holds a LUKS1
// header (the 592-byte partition header, then each key slot's anti-forensically
// split key material). Data clusters are encrypted with the master key in
// 512-byte sectors whose IV is the host (file) sector number, plain64.

const (
	cryptNone = 0
	cryptAES  = 1 // legacy qcow AES-CBC: not supported
	cryptLUKS = 2

	luksMagic       = "LUKS\xba\xbe"
	luksPhdrLen     = 592
	luksNumSlots    = 8
	luksSlotActive  = 0x00ac71f3
	luksSlotOff     = 0x0000dead
	luksStripes     = 4000
	luksDigestLen   = 20
	luksSaltLen     = 32
	luksSector      = 512
	luksSlotAlign   = 4096 // key material areas start on 4 KiB, as QEMU and cryptsetup place them
	luksMaxRegion   = 64 << 20
	luksMaxIter     = 1 << 24 // bounds the work a hostile header can ask of an open (QEMU calibrates 2 s: a few million)
	luksDefaultIter = 1000    // the key is 256 random bits, not a password: no stretching needed

	// parallelCrypt is the buffer size from which sectors are en/decrypted on
	// several cores.
	parallelCrypt = 256 << 10
)

// Encryption asks Create for a LUKS-encrypted image (QEMU's encrypt.format=luks,
// aes-256-xts-plain64, sha256, PBKDF2), its one key slot opened by Key.
type Encryption struct {
	// Key is the key slot's passphrase: what QEMU's encrypt.key-secret and a
	// libvirt passphrase secret hold. A random 256-bit value in hex is what cvd uses.
	Key []byte
	// Iterations of PBKDF2 for the key slot and the master-key digest; 0 means
	// 1000 (the minimum LUKS1 allows). QEMU's own default is what takes 2 s.
	Iterations int
}

// KeyFunc returns the passphrases that may open the encrypted layer at path (as
// Open resolved it), tried in turn, or none: the layer then opens locked (its
// metadata can be read, mapped and checked, its data cannot).
type KeyFunc func(path string) ([][]byte, error)

// KeyMap is a KeyFunc over a fixed map from absolute path to passphrase.
func KeyMap(m map[string][]byte) KeyFunc {
	return func(p string) ([][]byte, error) {
		if k, ok := m[p]; ok {
			return [][]byte{k}, nil
		}
		return nil, nil
	}
}

// Keys is a KeyFunc that offers the same passphrases for every layer.
func Keys(keys ...[]byte) KeyFunc {
	return func(string) ([][]byte, error) { return keys, nil }
}

var (
	keyringMu sync.RWMutex
	keyrings  = map[int]KeyFunc{}
	keyringN  int
)

// AddKeyring adds k to the keyring of every Open and Create that names no
// KeyFunc: a process that holds the keys of many layers (a laptop with
// encrypted copies) registers them once rather than threading them through
// every caller. The candidates of every KeyFunc added are tried. The returned
// function removes k.
func AddKeyring(k KeyFunc) (remove func()) {
	keyringMu.Lock()
	defer keyringMu.Unlock()
	keyringN++
	id := keyringN
	keyrings[id] = k
	return func() {
		keyringMu.Lock()
		delete(keyrings, id)
		keyringMu.Unlock()
	}
}

// keysOr is k, or the process's keyring when k is nil.
func keysOr(k KeyFunc) KeyFunc {
	if k != nil {
		return k
	}
	keyringMu.RLock()
	defer keyringMu.RUnlock()
	if len(keyrings) == 0 {
		return nil
	}
	all := make([]KeyFunc, 0, len(keyrings))
	for _, k := range keyrings {
		all = append(all, k)
	}
	return func(p string) ([][]byte, error) {
		var out [][]byte
		for _, k := range all {
			c, err := k(p)
			if err != nil {
				return nil, err
			}
			out = append(out, c...)
		}
		return out, nil
	}
}

type luksSlot struct {
	active     uint32
	iterations uint32
	salt       [luksSaltLen]byte
	keyOffset  uint32 // sectors from the start of the LUKS header
	stripes    uint32
}

type luksHeader struct {
	cipherName, cipherMode, hashSpec string
	payloadOffset                    uint32
	keyBytes                         uint32
	mkDigest                         [luksDigestLen]byte
	mkDigestSalt                     [luksSaltLen]byte
	mkDigestIter                     uint32
	uuid                             string
	slots                            [luksNumSlots]luksSlot
}

func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// parseLUKS decodes a LUKS1 header found in a region of length bytes.
func parseLUKS(b []byte, length int64) (*luksHeader, error) {
	if len(b) < luksPhdrLen || string(b[:6]) != luksMagic {
		return nil, formatErr(-1, "LUKS header", "no LUKS magic")
	}
	be := binary.BigEndian
	if v := be.Uint16(b[6:]); v != 1 {
		return nil, fmt.Errorf("%w: LUKS version %d (qcow2 embeds LUKS1)", ErrUnsupported, v)
	}
	h := &luksHeader{
		cipherName:    cstr(b[8:40]),
		cipherMode:    cstr(b[40:72]),
		hashSpec:      cstr(b[72:104]),
		payloadOffset: be.Uint32(b[104:]),
		keyBytes:      be.Uint32(b[108:]),
		mkDigestIter:  be.Uint32(b[164:]),
		uuid:          cstr(b[168:208]),
	}
	copy(h.mkDigest[:], b[112:132])
	copy(h.mkDigestSalt[:], b[132:164])
	if h.cipherName != "aes" || (h.cipherMode != "xts-plain64" && h.cipherMode != "xts-plain") {
		return nil, fmt.Errorf("%w: LUKS cipher %s-%s (cvd handles aes-xts-plain64)", ErrUnsupported, h.cipherName, h.cipherMode)
	}
	if luksHash(h.hashSpec) == nil {
		return nil, fmt.Errorf("%w: LUKS hash %q", ErrUnsupported, h.hashSpec)
	}
	if h.keyBytes != 32 && h.keyBytes != 64 {
		return nil, formatErr(108, "LUKS key_bytes", "%d is not an AES-XTS key length", h.keyBytes)
	}
	if h.mkDigestIter == 0 || h.mkDigestIter > luksMaxIter {
		return nil, formatErr(164, "LUKS mk_digest_iter", "%d out of range 1..%d", h.mkDigestIter, luksMaxIter)
	}
	for i := range h.slots {
		o := 208 + i*48
		s := &h.slots[i]
		s.active = be.Uint32(b[o:])
		s.iterations = be.Uint32(b[o+4:])
		copy(s.salt[:], b[o+8:o+40])
		s.keyOffset = be.Uint32(b[o+40:])
		s.stripes = be.Uint32(b[o+44:])
		switch s.active {
		case luksSlotOff:
			continue
		case luksSlotActive:
		default:
			return nil, formatErr(int64(o), "LUKS key slot", "slot %d state %#x", i, s.active)
		}
		if s.iterations == 0 || s.iterations > luksMaxIter {
			return nil, formatErr(int64(o+4), "LUKS key slot", "slot %d: %d iterations out of range", i, s.iterations)
		}
		if s.stripes == 0 || s.stripes > luksStripes {
			return nil, formatErr(int64(o+44), "LUKS key slot", "slot %d: %d stripes out of range 1..%d", i, s.stripes, luksStripes)
		}
		start := int64(s.keyOffset) * luksSector
		if start < luksPhdrLen || start+h.splitLen(s) > length {
			return nil, formatErr(int64(o+40), "LUKS key slot", "slot %d: key material at sector %d lies outside the %d-byte header", i, s.keyOffset, length)
		}
	}
	return h, nil
}

// splitLen is the bytes of a slot's key material, whole sectors.
func (h *luksHeader) splitLen(s *luksSlot) int64 {
	return (int64(h.keyBytes)*int64(s.stripes) + luksSector - 1) &^ (luksSector - 1)
}

func (h *luksHeader) encode() []byte {
	b := make([]byte, luksPhdrLen)
	be := binary.BigEndian
	copy(b, luksMagic)
	be.PutUint16(b[6:], 1)
	copy(b[8:40], h.cipherName)
	copy(b[40:72], h.cipherMode)
	copy(b[72:104], h.hashSpec)
	be.PutUint32(b[104:], h.payloadOffset)
	be.PutUint32(b[108:], h.keyBytes)
	copy(b[112:132], h.mkDigest[:])
	copy(b[132:164], h.mkDigestSalt[:])
	be.PutUint32(b[164:], h.mkDigestIter)
	copy(b[168:208], h.uuid)
	for i, s := range h.slots {
		o := 208 + i*48
		be.PutUint32(b[o:], s.active)
		be.PutUint32(b[o+4:], s.iterations)
		copy(b[o+8:o+40], s.salt[:])
		be.PutUint32(b[o+40:], s.keyOffset)
		be.PutUint32(b[o+44:], s.stripes)
	}
	return b
}

func luksHash(name string) func() hash.Hash {
	switch name {
	case "sha1":
		return sha1.New
	case "sha256":
		return sha256.New
	case "sha512":
		return sha512.New
	}
	return nil
}

// afMerge recovers a key from its anti-forensic split (LUKS1 AFmerge).
func afMerge(split []byte, keyLen, stripes int, newHash func() hash.Hash) []byte {
	buf := make([]byte, keyLen)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(buf, buf, split[i*keyLen:(i+1)*keyLen])
		diffuse(buf, newHash)
	}
	out := make([]byte, keyLen)
	subtle.XORBytes(out, buf, split[(stripes-1)*keyLen:stripes*keyLen])
	return out
}

// afSplit spreads key over stripes blocks, all but the last random.
func afSplit(key []byte, stripes int, newHash func() hash.Hash) ([]byte, error) {
	n := len(key)
	out := make([]byte, n*stripes)
	if _, err := rand.Read(out[:n*(stripes-1)]); err != nil {
		return nil, err
	}
	buf := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(buf, buf, out[i*n:(i+1)*n])
		diffuse(buf, newHash)
	}
	subtle.XORBytes(out[(stripes-1)*n:], buf, key)
	return out, nil
}

// diffuse is LUKS1's hash diffusion: each digest-sized piece i of b becomes
// H(be32(i) || piece), the last piece truncated.
func diffuse(b []byte, newHash func() hash.Hash) {
	h := newHash()
	ds := h.Size()
	var iv [4]byte
	for i, off := 0, 0; off < len(b); i, off = i+1, off+ds {
		end := min(off+ds, len(b))
		h.Reset()
		binary.BigEndian.PutUint32(iv[:], uint32(i))
		h.Write(iv[:])
		h.Write(b[off:end])
		copy(b[off:end], h.Sum(nil))
	}
}

// sectorCipher en/decrypts 512-byte sectors with AES-XTS (IEEE 1619), the IV
// being the sector number (plain64, or its low 32 bits for plain). It is
// x/crypto/xts's algorithm with the sector's 32 tweaks computed first and the
// AES calls of a sector back to back (independent: the CPU overlaps them),
// which runs about 2.5 times as fast.
type sectorCipher struct {
	k1, k2  cipher.Block
	plain32 bool
}

func newSectorCipher(key []byte, mode string) (*sectorCipher, error) {
	if len(key)%2 != 0 {
		return nil, fmt.Errorf("XTS key of %d bytes", len(key))
	}
	k1, err := aes.NewCipher(key[:len(key)/2])
	if err != nil {
		return nil, err
	}
	k2, err := aes.NewCipher(key[len(key)/2:])
	if err != nil {
		return nil, err
	}
	return &sectorCipher{k1: k1, k2: k2, plain32: mode == "xts-plain"}, nil
}

// sector en/decrypts one 512-byte sector.
func (s *sectorCipher) sector(dst, src []byte, iv uint64, decrypt bool) {
	const blocks = luksSector / aes.BlockSize
	var tw [blocks][2]uint64
	var t [aes.BlockSize]byte
	le := binary.LittleEndian
	le.PutUint64(t[:8], iv)
	s.k2.Encrypt(t[:], t[:])
	t0, t1 := le.Uint64(t[0:]), le.Uint64(t[8:])
	for i := range tw {
		tw[i] = [2]uint64{t0, t1}
		c := t1 >> 63 // multiply by α in GF(2^128)
		t1 = t1<<1 | t0>>63
		t0 = t0<<1 ^ c*0x87
	}
	dst, src = dst[:luksSector], src[:luksSector]
	for i := range tw {
		o := i * aes.BlockSize
		le.PutUint64(dst[o:], le.Uint64(src[o:])^tw[i][0])
		le.PutUint64(dst[o+8:], le.Uint64(src[o+8:])^tw[i][1])
	}
	for o := 0; o < luksSector; o += aes.BlockSize {
		if decrypt {
			s.k1.Decrypt(dst[o:o+aes.BlockSize], dst[o:o+aes.BlockSize])
		} else {
			s.k1.Encrypt(dst[o:o+aes.BlockSize], dst[o:o+aes.BlockSize])
		}
	}
	for i := range tw {
		o := i * aes.BlockSize
		le.PutUint64(dst[o:], le.Uint64(dst[o:])^tw[i][0])
		le.PutUint64(dst[o+8:], le.Uint64(dst[o+8:])^tw[i][1])
	}
}

// crypt runs dst = f(src) over whole sectors, the first being sector first; big
// buffers are split over the cores.
func (s *sectorCipher) crypt(dst, src []byte, first uint64, decrypt bool) {
	run := func(dst, src []byte, sector uint64) {
		for o := 0; o < len(src); o += luksSector {
			iv := sector
			if s.plain32 {
				iv &= 0xffffffff
			}
			s.sector(dst[o:o+luksSector], src[o:o+luksSector], iv, decrypt)
			sector++
		}
	}
	n := runtime.GOMAXPROCS(0)
	if len(src) < parallelCrypt || n < 2 {
		run(dst, src, first)
		return
	}
	per := (len(src)/luksSector + n - 1) / n * luksSector
	var wg sync.WaitGroup
	for o := 0; o < len(src); o += per {
		end := min(o+per, len(src))
		wg.Add(1)
		go func(o, end int) {
			defer wg.Done()
			run(dst[o:end], src[o:end], first+uint64(o/luksSector))
		}(o, end)
	}
	wg.Wait()
}

// cryptRun is whole sectors to decrypt in place, the first being sector.
type cryptRun struct {
	b      []byte
	sector uint64
}

// decryptRuns decrypts runs in place, in pieces of at most parallelCrypt bytes
// shared among the cores (many small runs of scattered clusters too).
func (s *sectorCipher) decryptRuns(runs []cryptRun) {
	var pieces []cryptRun
	total := 0
	for _, r := range runs {
		total += len(r.b)
		for o := 0; o < len(r.b); o += parallelCrypt / 4 {
			end := min(o+parallelCrypt/4, len(r.b))
			pieces = append(pieces, cryptRun{r.b[o:end], r.sector + uint64(o/luksSector)})
		}
	}
	workers := min(runtime.GOMAXPROCS(0), len(pieces))
	if total < parallelCrypt || workers < 2 {
		for _, p := range pieces {
			s.crypt(p.b, p.b, p.sector, true)
		}
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1) - 1; i < int64(len(pieces)); i = next.Add(1) - 1 {
				p := pieces[i]
				s.crypt(p.b, p.b, p.sector, true)
			}
		}()
	}
	wg.Wait()
}

// unlock tries pass on every active key slot and returns the data cipher.
// keyMaterial reads n bytes at offset off of the LUKS region.
func (h *luksHeader) unlock(pass []byte, keyMaterial func(off, n int64) ([]byte, error)) (*sectorCipher, error) {
	newHash := luksHash(h.hashSpec)
	for i := range h.slots {
		s := &h.slots[i]
		if s.active != luksSlotActive {
			continue
		}
		dk, err := pbkdf2.Key(newHash, string(pass), s.salt[:], int(s.iterations), int(h.keyBytes))
		if err != nil {
			return nil, err
		}
		km, err := keyMaterial(int64(s.keyOffset)*luksSector, h.splitLen(s))
		if err != nil {
			return nil, fmt.Errorf("read key slot %d: %w", i, err)
		}
		kc, err := newSectorCipher(dk, h.cipherMode)
		if err != nil {
			return nil, err
		}
		kc.crypt(km, km, 0, true)
		mk := afMerge(km, int(h.keyBytes), int(s.stripes), newHash)
		d, err := pbkdf2.Key(newHash, string(mk), h.mkDigestSalt[:], int(h.mkDigestIter), luksDigestLen)
		if err != nil {
			return nil, err
		}
		if subtle.ConstantTimeCompare(d, h.mkDigest[:]) == 1 {
			return newSectorCipher(mk, h.cipherMode)
		}
	}
	return nil, ErrBadKey
}

// newLUKS makes a LUKS1 region the way QEMU lays it out (8 key slots of 4 KiB-
// aligned key material after a 4 KiB header) with slot 0 opened by e.Key. It
// returns the region and the data cipher.
func newLUKS(e *Encryption) ([]byte, *sectorCipher, error) { return buildLUKS(e, luksStripes) }

// buildLUKS is newLUKS with a given number of anti-forensic stripes (LUKS1
// fixes 4000; fewer make small headers for the fuzzer's seeds).
func buildLUKS(e *Encryption, stripes int) ([]byte, *sectorCipher, error) {
	if len(e.Key) == 0 {
		return nil, nil, errors.New("encryption: empty key")
	}
	iter := e.Iterations
	if iter <= 0 {
		iter = luksDefaultIter
	}
	if iter > luksMaxIter {
		return nil, nil, fmt.Errorf("encryption: %d iterations exceed %d", iter, luksMaxIter)
	}
	h := &luksHeader{cipherName: "aes", cipherMode: "xts-plain64", hashSpec: "sha256", keyBytes: 64,
		mkDigestIter: uint32(iter), uuid: uuid.NewString()}
	mk := make([]byte, h.keyBytes)
	if _, err := rand.Read(mk); err != nil {
		return nil, nil, err
	}
	if _, err := rand.Read(h.mkDigestSalt[:]); err != nil {
		return nil, nil, err
	}
	d, err := pbkdf2.Key(sha256.New, string(mk), h.mkDigestSalt[:], iter, luksDigestLen)
	if err != nil {
		return nil, nil, err
	}
	copy(h.mkDigest[:], d)
	splitSectors := uint32((int64(h.keyBytes)*int64(stripes) + luksSlotAlign - 1) &^ (luksSlotAlign - 1) / luksSector)
	hdrSectors := uint32(luksSlotAlign / luksSector)
	for i := range h.slots {
		h.slots[i] = luksSlot{active: luksSlotOff, stripes: uint32(stripes), keyOffset: hdrSectors + uint32(i)*splitSectors}
	}
	h.payloadOffset = hdrSectors + luksNumSlots*splitSectors
	region := make([]byte, int64(h.payloadOffset)*luksSector)

	s := &h.slots[0]
	s.active, s.iterations = luksSlotActive, uint32(iter)
	if _, err := rand.Read(s.salt[:]); err != nil {
		return nil, nil, err
	}
	dk, err := pbkdf2.Key(sha256.New, string(e.Key), s.salt[:], iter, int(h.keyBytes))
	if err != nil {
		return nil, nil, err
	}
	split, err := afSplit(mk, stripes, sha256.New)
	if err != nil {
		return nil, nil, err
	}
	km := region[int64(s.keyOffset)*luksSector:][:h.splitLen(s)]
	copy(km, split)
	kc, err := newSectorCipher(dk, h.cipherMode)
	if err != nil {
		return nil, nil, err
	}
	kc.crypt(km, km, 0, false)
	copy(region, h.encode())
	c, err := newSectorCipher(mk, h.cipherMode)
	if err != nil {
		return nil, nil, err
	}
	return region, c, nil
}

// ShredKeys destroys the key slots of the encrypted qcow2 layer at path: the
// whole key-material area of the LUKS header is overwritten with random bytes,
// every slot is marked disabled, and the file is synced. Afterwards no key
// opens the layer (ErrBadKey), so its data is gone even if the file survives:
// a crypto-shred. A plain layer gives an error wrapping ErrNotEncrypted.
func ShredKeys(path string) error {
	f, _, h, err := openHeader(path)
	if err != nil {
		return fmt.Errorf("shred: %w", err)
	}
	defer f.Close()
	if h.cryptMethod != cryptLUKS {
		return fmt.Errorf("shred %s: %w", path, ErrNotEncrypted)
	}
	region := make([]byte, h.cryptLength)
	if _, err := f.ReadAt(region, int64(h.cryptOffset)); err != nil {
		return fmt.Errorf("shred %s: read LUKS header: %w", path, err)
	}
	if _, err := rand.Read(region[luksPhdrLen:]); err != nil {
		return err
	}
	if lh, err := parseLUKS(region, int64(len(region))); err == nil {
		for i := range lh.slots {
			lh.slots[i].active, lh.slots[i].iterations, lh.slots[i].salt = luksSlotOff, 0, [luksSaltLen]byte{}
		}
		copy(region, lh.encode())
	} else if _, err := rand.Read(region[:luksPhdrLen]); err != nil {
		return err
	}
	if _, err := f.WriteAt(region, int64(h.cryptOffset)); err != nil {
		return fmt.Errorf("shred %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("shred %s: %w", path, err)
	}
	return nil
}
