package disk

// DirectActive reports whether img writes aligned data through O_DIRECT
// (OpenOptions.DirectData took effect).
func DirectActive(img Image) bool {
	q, ok := img.(*Qcow2)
	return ok && q.direct != nil
}

// DirectWrites counts the data writes img made through O_DIRECT.
func DirectWrites(img Image) int64 {
	if q, ok := img.(*Qcow2); ok {
		return q.directWrites
	}
	return 0
}
