package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/catalog"
)

func TestVersion(t *testing.T) {
	var v versionInfo
	out := mustCvd(t, t.TempDir(), "--json", "version")
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if v.Version == "" || v.Go == "" || v.CatalogSchema != catalog.Version() || v.CatalogSchema < 1 {
		t.Errorf("version %+v", v)
	}
}

func TestErrorsAsJSON(t *testing.T) {
	tests := []struct {
		name string
		err  error
		code int
	}{
		{"failure", errors.New("boom"), exitFailure},
		{"usage", &exitError{code: exitUsage, err: errors.New("bad flag")}, exitUsage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			printError(&b, tt.err, true)
			var got struct {
				Error    string `json:"error"`
				ExitCode int    `json:"exit_code"`
			}
			if err := json.Unmarshal(b.Bytes(), &got); err != nil {
				t.Fatalf("not one JSON object: %q", b.String())
			}
			if got.Error != tt.err.Error() || got.ExitCode != tt.code {
				t.Errorf("got %+v", got)
			}
			b.Reset()
			printError(&b, tt.err, false)
			if b.String() != "cvd: "+tt.err.Error()+"\n" {
				t.Errorf("text error %q", b.String())
			}
		})
	}
}

// A command that only reads fails on a store directory that does not exist, and
// does not create it.
func TestReadOnlyCommandOnMissingStore(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-such-store")
	for _, args := range [][]string{{"layer", "ls"}, {"desktop", "ls"}, {"store", "info"}} {
		if _, err := cvdIn(t, missing, args...); err == nil {
			t.Errorf("cvd %v on a missing store succeeded", args)
		}
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("the missing store was created: %v", err)
	}
}

// TestEveryCommandHasExample: every command that runs something (not a group
// that only prints its help) has a short line, an example and an argument
// validator.
func TestEveryCommandHasExample(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			if sub.Hidden || sub.Name() == "help" || sub.Name() == "completion" {
				continue
			}
			walk(sub)
		}
		if !c.Runnable() || c.HasSubCommands() || c == c.Root() {
			return
		}
		if c.Example == "" || c.Short == "" || c.Args == nil {
			t.Errorf("cvd %s: needs Short, Example and Args", strings.TrimPrefix(c.CommandPath(), "cvd "))
		}
	}
	walk(newRootCommand())
}
