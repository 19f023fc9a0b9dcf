package layering

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
)

// writers lists the store's methods that write a desktop's record (its versions,
// its head, its tops) and the packages that may call them: package desktop is
// the only writer of versions and of the head (docs/ARCHITECTURE.md, "Rules").
var writers = map[string][]string{
	"UpdateDesktop": {"images", "desktop"},
	"CreateDesktop": {"images", "desktop"},
}

// TestOnlyDesktopWritesVersions fails when code outside the packages allowed
// calls a desktop writer. Test files may call them.
func TestOnlyDesktopWritesVersions(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	files := 0
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); path != root && (strings.HasPrefix(n, ".") || n == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		pkg, _ := filepath.Rel(root, filepath.Dir(path))
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		files++
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if may, ok := writers[sel.Sel.Name]; ok && !contains(may, filepath.ToSlash(pkg)) {
				t.Errorf("%s: %s calls %s: only %v write desktops", fset.Position(call.Pos()), pkg, sel.Sel.Name, may)
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 50 {
		t.Fatalf("only %d Go files read under %s", files, root)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
