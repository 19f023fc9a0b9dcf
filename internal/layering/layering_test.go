package layering

import (
	"encoding/json"
	"os/exec"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/cvd-project/cvd/"

// allowed lists, for each package, the packages of this module it may import
// (docs/ARCHITECTURE.md, "Packages"). A package not listed may import nothing of
// the module but internal helpers.
var allowed = map[string][]string{
	"cmd/cvd":           {"syncd", "syncd/laptop", "syncd/proto", "vm", "desktop", "overlay", "files", "clone", "hypervisor", "images", "catalog", "disk", "internal/proc", "internal/ordered"},
	"vm":                {"hypervisor", "images", "disk"},
	"syncd/laptop":      {"syncd/state", "syncd/proto", "vm", "desktop", "clone", "images", "catalog", "disk", "nbd", "internal/fsutil"},
	"syncd/proto":       {"desktop", "images", "internal/ordered"},
	"syncd/state":       {"syncd/proto", "desktop", "images", "catalog", "disk"},
	"syncd":             {"syncd/state", "syncd/proto", "desktop", "files", "images", "catalog", "disk", "internal/proc", "internal/fsutil", "internal/ordered"},
	"desktop":           {"overlay", "files", "images", "catalog", "disk", "internal/proc", "internal/fsutil"},
	"files":             {"disk"},
	"overlay":           {"disk", "internal/proc", "internal/fsutil", "internal/ordered"},
	"clone":             {"files", "images", "disk", "internal/proc", "internal/fsutil"},
	"hypervisor":        {"disk"},
	"images":            {"catalog", "disk", "internal/proc", "internal/fsutil", "internal/ordered"},
	"catalog":           {},
	"disk":              {},
	"nbd":               {},
	"internal/proc":     {},
	"internal/testutil": {},
	"internal/layering": {},
	"internal/fsutil":   {},
	"internal/ordered":  {},
	"internal/labtest":  {"disk", "internal/testutil"},
}

// TestImportDirection fails when a package imports one it may not (an import
// upward, or sideways where the design has none). Test files may import more.
func TestImportDirection(t *testing.T) {
	out, err := exec.Command("go", "list", "-json=ImportPath,Imports", module+"...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	seen := 0
	for dec.More() {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		name := strings.TrimPrefix(p.ImportPath, module)
		ok, listed := allowed[name]
		if !listed {
			t.Errorf("package %s is not in the layering table (docs/ARCHITECTURE.md and this test)", name)
			continue
		}
		seen++
		may := map[string]bool{}
		for _, a := range ok {
			may[a] = true
		}
		var bad []string
		for _, imp := range p.Imports {
			dep, mine := strings.CutPrefix(imp, module)
			if mine && !may[dep] {
				bad = append(bad, dep)
			}
		}
		sort.Strings(bad)
		if len(bad) > 0 {
			t.Errorf("%s imports %v, against the layering", name, bad)
		}
	}
	if seen < 8 {
		t.Fatalf("only %d packages listed", seen)
	}
}
