package files

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"
)

// Three-way merges of file trees. Both merges here compare two trees that
// went their own ways (ours and theirs) against the tree they share (base),
// path by path, and give the ops that make the merged tree out of one of
// them: a recompose (RecomposeMerge) builds on the new layers (theirs) and
// brings the desktop's own changes (ours); a sync merge (SyncMerge, the
// seed's Table 1) builds on this device's tree (here) and brings what
// changed elsewhere. Entries are equal when all but their modification time
// is (Diff's rule).

// same reports whether a and b (nil: absent) are the same file.
func same(a, b *Entry) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	x, y := *a, *b
	x.MTime, y.MTime = time.Time{}, time.Time{}
	return x == y
}

// threeWay calls fn for every path of base, ours and theirs (sorted by path),
// with nil for a tree that lacks it.
func threeWay(base, ours, theirs []Entry, fn func(p string, b, o, t *Entry)) {
	idx := func(es []Entry) map[string]*Entry {
		m := make(map[string]*Entry, len(es))
		for i := range es {
			m[es[i].Path] = &es[i]
		}
		return m
	}
	mb, mo, mt := idx(base), idx(ours), idx(theirs)
	var paths []string
	for _, m := range []map[string]*Entry{mb, mo, mt} {
		for p := range m {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	for i, p := range paths {
		if i > 0 && paths[i-1] == p {
			continue
		}
		fn(p, mb[p], mo[p], mt[p])
	}
}

// Path classes of the rule list.
const (
	ClassUser   = "user"
	ClassSystem = "system"
)

// Rule says which class a path is in: Pattern is a path.Match pattern on the
// whole path, or, ending in "/**", the directory before it and everything
// below.
type Rule struct {
	Class   string `json:"class"`
	Pattern string `json:"pattern"`
}

// DefaultRules: home directories (and root's) are the user's; everything else
// is the system's.
func DefaultRules() []Rule {
	return []Rule{{ClassUser, "/home/**"}, {ClassUser, "/root/**"}, {ClassSystem, "/**"}}
}

// maxRules bounds a rule list.
const maxRules = 10000

// ParseRules reads a rule list: one rule a line, "user PATTERN" or "system
// PATTERN"; blank lines and lines starting with # are skipped. The first
// rule that matches a path decides; a path no rule matches is a system path.
func ParseRules(r io.Reader) ([]Rule, error) {
	var out []Rule
	sc := bufio.NewScanner(r)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 || (f[0] != ClassUser && f[0] != ClassSystem) {
			return nil, fmt.Errorf("rules line %d: %q: want \"user PATTERN\" or \"system PATTERN\"", n, line)
		}
		if !strings.HasPrefix(f[1], "/") {
			return nil, fmt.Errorf("rules line %d: pattern %q is not absolute", n, f[1])
		}
		if _, err := path.Match(strings.TrimSuffix(f[1], "/**"), "/"); err != nil {
			return nil, fmt.Errorf("rules line %d: pattern %q: %w", n, f[1], err)
		}
		if len(out) == maxRules {
			return nil, fmt.Errorf("rules: more than %d rules", maxRules)
		}
		out = append(out, Rule{Class: f[0], Pattern: f[1]})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("rules: %w", err)
	}
	return out, nil
}

// Classify returns the class of p and the rule that decided it.
func Classify(rules []Rule, p string) (string, Rule) {
	for _, r := range rules {
		if matchRule(r.Pattern, p) {
			return r.Class, r
		}
	}
	return ClassSystem, Rule{}
}

func matchRule(pattern, p string) bool {
	if dir, ok := strings.CutSuffix(pattern, "/**"); ok {
		if dir == "" {
			return true
		}
		parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
		depth := strings.Count(dir, "/")
		if len(parts) < depth {
			return false
		}
		ok, _ := path.Match(dir, "/"+strings.Join(parts[:depth], "/"))
		return ok
	}
	ok, _ := path.Match(pattern, p)
	return ok
}

// Override is a path that both the desktop and the new layers changed, and
// which of them the rules let win.
type Override struct {
	Path   string `json:"path"`
	Class  string `json:"class"`
	Winner string `json:"winner"` // "layer" or "desktop"
	Rule   string `json:"rule,omitempty"`
	// The two versions (nil: removed); the loser stays in the desktop's old
	// version (the desktop's) or in the new layers (the layer's).
	Desktop *Entry `json:"desktop,omitempty"`
	Layer   *Entry `json:"layer,omitempty"`
}

// RecomposePlan is what a recompose by files does to one file system.
type RecomposePlan struct {
	Ops        []Op       `json:"ops"`
	Skipped    []Skip     `json:"skipped,omitempty"`
	Overridden []Override `json:"overridden,omitempty"`
	// Unchanged counts the desktop's changes the new layers already hold.
	Unchanged int `json:"same-in-both,omitempty"`
}

// RecomposeMerge plans the desktop's own changes (base → ours) over the new
// layers (theirs): each path the desktop changed and the layers did not gets
// the desktop's version; a path both changed differently goes by the rules:
// a user path gets the desktop's version, a system path keeps the layer's,
// and either is listed in Overridden. The ops are made on theirs, with the
// contents read from ours.
func RecomposeMerge(base, ours, theirs []Entry, rules []Rule) *RecomposePlan {
	pl := &RecomposePlan{}
	res := newResult(theirs, ours)
	threeWay(base, ours, theirs, func(p string, b, o, t *Entry) {
		if same(b, o) {
			return
		}
		if !same(b, t) {
			if same(o, t) {
				pl.Unchanged++
				return
			}
			class, rule := Classify(rules, p)
			ov := Override{Path: p, Class: class, Rule: rule.Pattern, Desktop: o, Layer: t, Winner: "layer"}
			if class == ClassUser {
				ov.Winner = "desktop"
			}
			pl.Overridden = append(pl.Overridden, ov)
			if ov.Winner == "layer" {
				return
			}
		}
		res.take(p, o)
	})
	pl.Ops, pl.Skipped = res.ops(), res.skipped
	return pl
}

// Table 1 cases (SyncMerge).
const (
	CaseAddedElsewhere     = "added elsewhere"
	CaseAddedHere          = "added here"
	CaseDeletedElsewhere   = "deleted elsewhere, unchanged here"
	CaseDeletedHere        = "deleted here, unchanged elsewhere"
	CaseChangedElsewhere   = "changed elsewhere, unchanged here"
	CaseChangedHere        = "changed here, unchanged elsewhere"
	CaseSameChange         = "same change"
	CaseChangedDifferently = "changed differently"
	CaseChangedHereDeleted = "changed here, deleted elsewhere"
	CaseDeletedHereChanged = "deleted here, changed elsewhere"
)

// Table 1 actions.
const (
	ActTake   = "take"   // the version from elsewhere
	ActDelete = "delete" // removed here too
	ActKeep   = "keep"   // this device's version stays
	ActNone   = "none"   // nothing to do
	ActBoth   = "keep both"
)

// Resolution is how a sync merge settled one path.
type Resolution struct {
	Path   string `json:"path"`
	Case   string `json:"case"`
	Action string `json:"action"`
	// Copy is the name the version from elsewhere is kept under (keep both).
	Copy string `json:"copy,omitempty"`
}

// SyncPlan is what a sync merge does to one file system.
type SyncPlan struct {
	Ops         []Op         `json:"ops"`
	Skipped     []Skip       `json:"skipped,omitempty"`
	Resolutions []Resolution `json:"resolutions"`
}

// ConflictName is the name the other device's version of p is kept under:
// "NAME (conflicted copy DEVICE DATE).EXT".
func ConflictName(p, device string, when time.Time) string {
	dir, name := path.Split(p)
	ext := path.Ext(name)
	if ext == name || len(ext) > 16 {
		ext = ""
	}
	stem := strings.TrimSuffix(name, ext)
	return dir + stem + " (conflicted copy " + device + " " + when.UTC().Format("2006-01-02 150405") + ")" + ext
}

// SyncMerge merges what changed elsewhere (base → theirs, another device's
// check-in) into this device's tree (base → ours) by the seed's Table 1:
//
//	added elsewhere                    → take it
//	added, deleted or changed here only → keep this device's tree
//	deleted elsewhere, unchanged here  → delete
//	changed elsewhere, unchanged here  → take it
//	same change on both                → nothing
//	changed differently                → keep both: the other as
//	                                     "NAME (conflicted copy DEVICE DATE)"
//	changed here, deleted elsewhere    → keep it
//	deleted here, changed elsewhere    → take it (nothing is lost)
//
// The ops are made on ours, with the contents read from theirs; device and
// when name the other device's conflicted copies. Every path either side
// changed gets a Resolution.
func SyncMerge(base, ours, theirs []Entry, device string, when time.Time) *SyncPlan {
	pl := &SyncPlan{Resolutions: []Resolution{}}
	res := newResult(ours, theirs)
	taken := map[string]bool{}
	for _, e := range ours {
		taken[e.Path] = true
	}
	threeWay(base, ours, theirs, func(p string, b, o, t *Entry) {
		here, there := !same(b, o), !same(b, t)
		r := Resolution{Path: p}
		switch {
		case !here && !there:
			return
		case !there:
			r.Action = ActKeep
			switch {
			case b == nil:
				r.Case = CaseAddedHere
			case o == nil:
				r.Case = CaseDeletedHere
			default:
				r.Case = CaseChangedHere
			}
		case !here:
			switch {
			case b == nil:
				r.Case, r.Action = CaseAddedElsewhere, ActTake
			case t == nil:
				r.Case, r.Action = CaseDeletedElsewhere, ActDelete
			default:
				r.Case, r.Action = CaseChangedElsewhere, ActTake
			}
			res.take(p, t)
		case same(o, t):
			r.Case, r.Action = CaseSameChange, ActNone
		case t == nil:
			r.Case, r.Action = CaseChangedHereDeleted, ActKeep
		case o == nil:
			r.Case, r.Action = CaseDeletedHereChanged, ActTake
			res.take(p, t)
		default:
			r.Case, r.Action = CaseChangedDifferently, ActKeep
			if t.Type == "file" || t.Type == "symlink" {
				// Both names stay; the copy takes the first free name.
				name := ConflictName(p, device, when)
				for i := 2; taken[name]; i++ {
					name = ConflictName(p, fmt.Sprintf("%s %d", device, i), when)
				}
				taken[name] = true
				c := *t
				c.Path = name
				res.take(name, &c)
				res.from[name] = p
				r.Action, r.Copy = ActBoth, name
			}
		}
		pl.Resolutions = append(pl.Resolutions, r)
	})
	pl.Ops, pl.Skipped = res.ops(), res.skipped
	return pl
}

// result tracks the merged tree while a merge plans its ops: it starts as
// start and takes entries from other (whose directories are made first where
// a taken path lacks its parents).
type result struct {
	have    map[string]string // path → type in the merged tree
	other   map[string]*Entry
	removes []Op
	makes   []Op
	from    map[string]string // write's source path when it differs
	skipped []Skip
}

func newResult(start, other []Entry) *result {
	r := &result{have: map[string]string{}, other: map[string]*Entry{}, from: map[string]string{}}
	for _, e := range start {
		r.have[e.Path] = e.Type
	}
	for i := range other {
		r.other[other[i].Path] = &other[i]
	}
	return r
}

// take makes p what e is (nil: removed).
func (r *result) take(p string, e *Entry) {
	if e == nil {
		if _, ok := r.have[p]; ok {
			r.removes = append(r.removes, Op{Kind: OpRemove, Path: p})
			delete(r.have, p)
		}
		return
	}
	r.parents(p)
	r.have[p] = e.Type
	r.makes = append(r.makes, Op{Path: p, Entry: e})
}

// parents makes the directories above p that the merged tree lacks, from
// other's entries.
func (r *result) parents(p string) {
	dir := path.Dir(p)
	if dir == p || dir == "/" {
		return
	}
	if t, ok := r.have[dir]; ok && t == "dir" {
		return
	}
	r.parents(dir)
	e := r.other[dir]
	if e == nil || e.Type != "dir" {
		e = &Entry{Path: dir, Type: "dir", Mode: "0755"}
	}
	r.have[dir] = "dir"
	r.makes = append(r.makes, Op{Path: dir, Entry: e})
}

// ops are the removals, deepest first, then the makes in the order taken
// (parents before children); a type other than file, dir and symlink is left
// out (the writer makes no device nodes).
func (r *result) ops() []Op {
	sort.Slice(r.removes, func(i, j int) bool { return r.removes[i].Path > r.removes[j].Path })
	out := append([]Op{}, r.removes...)
	for _, o := range r.makes {
		switch o.Entry.Type {
		case "file":
			o.Kind, o.From = OpWrite, r.from[o.Path]
		case "dir":
			o.Kind = OpMkdir
		case "symlink":
			o.Kind = OpSymlink
		default:
			r.skipped = append(r.skipped, Skip{Path: o.Path, Why: "a special file (" + o.Entry.Type + "): not written"})
			continue
		}
		out = append(out, o)
	}
	return out
}
