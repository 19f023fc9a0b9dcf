package proto

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// LayerIDRE matches a layer ID: 64 lowercase hex digits (a SHA-256).
var LayerIDRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// ClusterRef is where a cluster with a known digest can be read.
type ClusterRef struct {
	Layer string
	Index int64
}

// HexID is a layer ID's 32 bytes.
func HexID(id string) ([]byte, error) {
	if !LayerIDRE.MatchString(id) {
		return nil, fmt.Errorf("bad layer id %q", id)
	}
	b := make([]byte, 32)
	for i := range b {
		v, err := strconv.ParseUint(id[2*i:2*i+2], 16, 8)
		if err != nil {
			return nil, err
		}
		b[i] = byte(v)
	}
	return b, nil
}

// TokenPrefix starts every device token: "cvd1_<device id>_<secret>".
const TokenPrefix = "cvd1_"

var deviceIDRE = regexp.MustCompile(`^[0-9a-f]{16}$`)

// TokenDevice extracts the device ID from a well-formed device token.
func TokenDevice(tok string) (string, bool) {
	rest, ok := strings.CutPrefix(tok, TokenPrefix)
	if !ok {
		return "", false
	}
	id, secret, ok := strings.Cut(rest, "_")
	if !ok || !deviceIDRE.MatchString(id) || len(secret) < 32 {
		return "", false
	}
	return id, true
}
