package images

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/catalog"
)

// versionRows counts the versions table's rows for a desktop.
func versionRows(t *testing.T, s *Store, desktop string) int {
	t.Helper()
	var n int
	err := s.Catalog().View(func(tx *catalog.Tx) error {
		return tx.Query("SELECT COUNT(*) FROM versions WHERE desktop = ?", []any{desktop},
			func(scan func(...any) error) error { return scan(&n) })
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestVersionsTable(t *testing.T) {
	f := newFixture(t)
	s := f.s
	ctx := context.Background()
	_, err := s.CreateDesktop(ctx, "d", DesktopSpec{Base: "os:1"})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	add := func(v Version) func(d *Desktop) error {
		return func(d *Desktop) error {
			v.N, v.Created, v.System = len(d.Versions)+1, now, d.HeadVersion().System
			d.Versions = append(d.Versions, v)
			d.Head = v.N
			return nil
		}
	}
	for _, v := range []Version{
		{Kind: VersionCheckin, Checkin: "c1", Device: "lap", Bytes: 42, From: 1},
		{Kind: VersionSeal, Note: "check-out seal", From: 2},
		{Kind: VersionConflict, Checkin: "c2", From: 1},
	} {
		if _, err := s.UpdateDesktop(nil, "d", add(v)); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Desktop("d")
	if err != nil {
		t.Fatal(err)
	}
	kinds := []VersionKind{}
	for _, v := range got.Versions {
		kinds = append(kinds, v.Kind)
	}
	if want := []VersionKind{VersionCreate, VersionCheckin, VersionSeal, VersionConflict}; !slices.Equal(kinds, want) {
		t.Fatalf("kinds %v, want %v", kinds, want)
	}
	if v := got.Versions[1]; v.Checkin != "c1" || v.Device != "lap" || v.Bytes != 42 || v.From != 1 || !v.Created.Equal(now.Truncate(time.Second)) {
		t.Errorf("version 2 read back as %+v", v)
	}
	if !got.Versions[3].Conflict {
		t.Error("a conflict version reads back without its conflict flag")
	}

	// The table refuses what the catalog must never hold, and the refused update
	// changes nothing.
	refused := []struct {
		name string
		v    Version
	}{
		{"a check-in ID twice in one desktop", Version{Kind: VersionCheckin, Checkin: "c1"}},
		{"an unknown kind", Version{Kind: "bogus"}},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := s.UpdateDesktop(nil, "d", add(tt.v)); err == nil {
				t.Fatal("the catalog took it")
			}
			if n := versionRows(t, s, "d"); n != 4 {
				t.Errorf("%d version rows after a refused update, want 4", n)
			}
		})
	}

	// A prune deletes rows; removing the desktop deletes the rest.
	if _, err := s.UpdateDesktop(nil, "d", func(d *Desktop) error {
		d.Versions = slices.DeleteFunc(d.Versions, func(v Version) bool { return v.N == 2 })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n := versionRows(t, s, "d"); n != 3 {
		t.Errorf("%d version rows after pruning one of 4", n)
	}
	mustClean(t, s)
	if _, _, err := s.RemoveDesktop("d", false); err != nil {
		t.Fatal(err)
	}
	if n := versionRows(t, s, "d"); n != 0 {
		t.Errorf("%d version rows left after desktop rm", n)
	}
}

// TestVersionsMoveIntoTable: a store whose catalog predates the versions table
// (schema 1: the versions listed in each desktop's record, some without a kind)
// has them moved into the table on its next open, with nothing lost.
func TestVersionsMoveIntoTable(t *testing.T) {
	f := newFixture(t)
	s := f.s
	ctx := context.Background()
	if _, err := s.CreateDesktop(ctx, "d", DesktopSpec{Base: "os:1", Apps: []string{"office:1"}}); err != nil {
		t.Fatal(err)
	}
	legacy := []Version{
		{N: 1, Note: "create"},
		{N: 2, Note: "check-in 5f3a", Checkin: "5f3a", Device: "lap", From: 1},
		{N: 3, Note: "server changes before check-in", From: 2},
		{N: 4, Note: "conflict 77aa", Checkin: "77aa", Conflict: true, From: 2},
	}
	d, err := s.Desktop("d")
	if err != nil {
		t.Fatal(err)
	}
	for i := range legacy {
		legacy[i].Created = d.Versions[0].Created
		legacy[i].System = f.app.ID
	}
	// Back to schema 1: the record lists its versions, the table is gone.
	d.Versions, d.Head = legacy, 3
	raw, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Catalog().Update(func(tx *catalog.Tx) error {
		if err := tx.Bucket(bucketDesktops).Put([]byte("d"), raw); err != nil {
			return err
		}
		for _, q := range []string{"DROP TABLE versions", "DROP TABLE leases", "DROP TABLE device_desktops", "DROP TABLE class_bases", "DROP TABLE class_layers",
			"DROP TABLE devices", "DELETE FROM goose_db_version WHERE version_id >= 2"} {
			if _, err := tx.Exec(q); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	dir := s.Dir()
	s.Close()

	s2, err := Open(dir, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f.s = s2
	defer s2.Close()
	if rec := strings.Join(s2.Recovered(), "; "); !strings.Contains(rec, "versions listed in desktop records: 1 records moved") {
		t.Errorf("recovered: %q", rec)
	}
	got, err := s2.Desktop("d")
	if err != nil {
		t.Fatal(err)
	}
	want := []VersionKind{VersionCreate, VersionCheckin, VersionSeal, VersionConflict}
	if len(got.Versions) != len(want) || got.Head != 3 {
		t.Fatalf("after the move: head %d, versions %+v", got.Head, got.Versions)
	}
	for i, v := range got.Versions {
		if v.Kind != want[i] || v.N != legacy[i].N || v.Checkin != legacy[i].Checkin || v.Note != legacy[i].Note || v.System != f.app.ID {
			t.Errorf("version %d: %+v, want kind %s from %+v", i+1, v, want[i], legacy[i])
		}
	}
	if n := versionRows(t, s2, "d"); n != 4 {
		t.Errorf("%d rows in the versions table, want 4", n)
	}
	err = s2.Catalog().View(func(tx *catalog.Tx) error {
		if rec := tx.Bucket(bucketDesktops).Get([]byte("d")); strings.Contains(string(rec), "5f3a") {
			t.Errorf("the desktop's record still lists its versions: %s", rec)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	mustClean(t, s2)
}
