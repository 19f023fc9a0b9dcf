package images

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/cvd-project/cvd/catalog"
)

// DefaultTag is the tag of a name given without one.
const DefaultTag = "latest"

// MinPrefix is the shortest ID prefix a reference may use.
const MinPrefix = 4

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	tagRE  = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
	// objRE is for desktops and clones: their names become file names and hostnames.
	objRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)
	hexRE = regexp.MustCompile(`^[0-9a-f]+$`)
)

// ParseNameTag splits "name:tag" (a missing tag is DefaultTag) and checks both.
func ParseNameTag(s string) (name, tag string, err error) {
	name, tag, ok := strings.Cut(s, ":")
	if !ok {
		tag = DefaultTag
	}
	if !nameRE.MatchString(name) || !tagRE.MatchString(tag) {
		return "", "", fmt.Errorf("%w: layer name %q: want NAME:TAG of letters, digits, '.', '_', '-'", ErrInvalid, s)
	}
	if hexRE.MatchString(name) && len(name) >= MinPrefix && !ok {
		// A bare hex word would read as an ID prefix.
		return "", "", fmt.Errorf("%w: layer name %q looks like an ID; give a tag", ErrInvalid, s)
	}
	return name, tag, nil
}

// CheckObjectName checks a desktop or clone name: it is used in file names and as
// a hostname, so it is letters, digits, '-' and '_', at most 63 characters.
func CheckObjectName(kind, s string) error {
	if !objRE.MatchString(s) {
		return fmt.Errorf("%w: %s name %q: want 1-63 letters, digits, '-' or '_', starting with a letter or digit", ErrInvalid, kind, s)
	}
	return nil
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// ShortID is the 12-digit prefix cvd prints for an ID.
func ShortID(id string) string { return shortID(id) }

// Resolve turns a layer reference (ID, ID prefix, NAME:TAG or NAME) into a full ID.
func (s *Store) Resolve(ref string) (string, error) {
	var id string
	err := s.db.View(func(tx *catalog.Tx) error {
		var err error
		id, err = resolveTx(tx, ref)
		return err
	})
	return id, err
}

func resolveTx(tx *catalog.Tx, ref string) (string, error) {
	names := tx.Bucket(bucketNames)
	if strings.Contains(ref, ":") && !strings.HasPrefix(ref, "sha256:") {
		if v := names.Get([]byte(ref)); v != nil {
			return string(v), nil
		}
		return "", fmt.Errorf("layer %s: %w", ref, ErrNotFound)
	}
	// A bare name: NAME:latest, or NAME's only tag.
	if nameRE.MatchString(ref) {
		if v := names.Get([]byte(ref + ":" + DefaultTag)); v != nil {
			return string(v), nil
		}
		var tags []string
		var ids []string
		prefix := []byte(ref + ":")
		c := names.Cursor()
		for k, v := c.Seek(prefix); k != nil && strings.HasPrefix(string(k), string(prefix)); k, v = c.Next() {
			tags = append(tags, string(k))
			ids = append(ids, string(v))
		}
		if len(tags) == 1 {
			return ids[0], nil
		}
		if len(tags) > 1 {
			return "", fmt.Errorf("layer %s: %w: give a tag: %s", ref, ErrAmbiguous, strings.Join(tags, ", "))
		}
	}
	p := strings.TrimPrefix(ref, "sha256:")
	if len(p) < MinPrefix || !hexRE.MatchString(p) {
		return "", fmt.Errorf("layer %s: %w", ref, ErrNotFound)
	}
	var found []string
	c := tx.Bucket(bucketLayers).Cursor()
	for k, _ := c.Seek([]byte(p)); k != nil && strings.HasPrefix(string(k), p); k, _ = c.Next() {
		found = append(found, string(k))
		if len(found) > 1 {
			return "", fmt.Errorf("layer %s: %w: matches %s and %s", ref, ErrAmbiguous, shortID(found[0]), shortID(found[1]))
		}
	}
	if len(found) == 0 {
		return "", fmt.Errorf("layer %s: %w", ref, ErrNotFound)
	}
	return found[0], nil
}

// namesOf lists the NAME:TAGs pointing at id, sorted.
func namesOf(tx *catalog.Tx, id string) []string {
	var out []string
	keys, _ := tx.Bucket(bucketNames).KeysWith([]byte(id)) // an error is the transaction's
	for _, k := range keys {
		out = append(out, string(k))
	}
	return out
}

// allNames maps layer IDs to their names.
func allNames(tx *catalog.Tx) map[string][]string {
	out := map[string][]string{}
	tx.Bucket(bucketNames).ForEach(func(k, v []byte) error {
		out[string(v)] = append(out[string(v)], string(k))
		return nil
	})
	return out
}

// putNames points each NAME:TAG at id. A tag that points at another layer is an
// error unless move is set.
func putNames(tx *catalog.Tx, id string, nameTags []string, move bool) error {
	b := tx.Bucket(bucketNames)
	for _, nt := range nameTags {
		n, t, err := ParseNameTag(nt)
		if err != nil {
			return err
		}
		key := n + ":" + t
		if old := b.Get([]byte(key)); old != nil && string(old) != id && !move {
			return fmt.Errorf("%w: %s points at layer %s (tag it again with --force to move it)", ErrExists, key, shortID(string(old)))
		}
		if err := b.Put([]byte(key), []byte(id)); err != nil {
			return err
		}
	}
	return nil
}

// Tag points NAME:TAG at the layer ref names; force moves a tag held by another layer.
func (s *Store) Tag(ref, nameTag string, force bool) error {
	if err := s.writable(); err != nil {
		return err
	}
	return s.db.Update(func(tx *catalog.Tx) error {
		id, err := resolveTx(tx, ref)
		if err != nil {
			return err
		}
		return putNames(tx, id, []string{nameTag}, force)
	})
}

// Untag removes NAME:TAG. The layer stays; gc removes it when nothing else keeps it.
func (s *Store) Untag(nameTag string) error {
	if err := s.writable(); err != nil {
		return err
	}
	n, t, err := ParseNameTag(nameTag)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *catalog.Tx) error {
		b := tx.Bucket(bucketNames)
		key := []byte(n + ":" + t)
		if b.Get(key) == nil {
			return fmt.Errorf("name %s: %w", key, ErrNotFound)
		}
		return b.Delete(key)
	})
}
