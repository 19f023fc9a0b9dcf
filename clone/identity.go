package clone

import (
	"crypto/rand"
	"fmt"
	"strings"

	"github.com/google/uuid"
)

// Identity is what makes a clone a machine of its own. It is never synced.
type Identity struct {
	UUID     string `json:"uuid"`     // random (version 4); also the cloud-init instance-id
	MAC      string `json:"mac"`      // locally administered unicast, 02:xx:xx:xx:xx:xx
	Hostname string `json:"hostname"` // RFC 1123 label made from the clone's name
}

// Hostname turns a clone name into an RFC 1123 host label: lower case letters,
// digits and '-', at most 63 characters, not starting or ending with '-'.
func Hostname(name string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(name) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	h := b.String()
	if len(h) > 63 {
		h = h[:63]
	}
	h = strings.Trim(h, "-")
	if h == "" {
		h = "clone"
	}
	return h
}

// RandomMAC returns a random locally administered unicast MAC, 02:xx:xx:xx:xx:xx.
func RandomMAC() string {
	var b [5]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return fmt.Sprintf("02:%02x:%02x:%02x:%02x:%02x", b[0], b[1], b[2], b[3], b[4])
}

// NewIdentities makes one identity per name, with MACs unique among themselves and
// not in used.
func NewIdentities(names []string, used map[string]bool) ([]Identity, error) {
	seen := make(map[string]bool, len(names))
	out := make([]Identity, len(names))
	for i, n := range names {
		u, err := uuid.NewRandom()
		if err != nil {
			return nil, err
		}
		mac := RandomMAC()
		for tries := 0; used[mac] || seen[mac]; tries++ {
			if tries > 1000 {
				return nil, fmt.Errorf("no free MAC address after %d tries", tries)
			}
			mac = RandomMAC()
		}
		seen[mac] = true
		out[i] = Identity{UUID: u.String(), MAC: mac, Hostname: Hostname(n)}
	}
	return out, nil
}
