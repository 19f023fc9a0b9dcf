package desktop

import (
	"context"
	"testing"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/labtest"
)

// TestAddVersionFence: a check-in made under a lease moves the head only while
// that lease (its epoch) is the desktop's active one in the commit's
// transaction; otherwise it is kept beside the head as a conflict.
func TestAddVersionFence(t *testing.T) {
	sl := newStoreLab(t, labtest.Seed(t))
	ctx := context.Background()
	bp := sl.Create("base", "", 8<<20, 64<<10)
	base := sl.layer(bp, images.KindBase, "", "os:1")
	if _, err := sl.st.CreateDesktop(ctx, "d", images.DesktopSpec{Base: "os:1"}); err != nil {
		t.Fatal(err)
	}
	lease := func(id string, epoch int64, state string) {
		t.Helper()
		now := time.Now().UTC()
		err := sl.st.Catalog().Update(func(tx *catalog.Tx) error {
			if _, err := tx.Exec("UPDATE leases SET state = 'released', ended = ? WHERE desktop = 'd' AND state = 'active'", now); err != nil {
				return err
			}
			_, err := tx.Exec("INSERT INTO leases (id, desktop, epoch, device, device_name, granted, expires, version, state)"+
				" VALUES (?, 'd', ?, 'dev', 'lap', ?, ?, 1, ?)", id, epoch, now, now.Add(time.Hour), state)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	checkin := func(id string, fence int64) images.Version {
		t.Helper()
		d, err := sl.st.Desktop("d")
		if err != nil {
			t.Fatal(err)
		}
		_, v, err := AddVersion(sl.st, "d", images.Version{Kind: images.VersionCheckin, Checkin: id, From: d.Head,
			System: base.ID, Created: time.Now()}, true, fence)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	tests := []struct {
		name     string
		lease    func()
		fence    int64
		conflict bool
	}{
		{"under the active lease", func() { lease("a", 1, "active") }, 1, false},
		{"under a lease since replaced", func() { lease("b", 2, "active") }, 1, true},
		{"under a lease since released", func() { lease("c", 3, "released") }, 2, true},
		{"under the new active lease", func() { lease("d", 4, "active") }, 4, false},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.lease()
			v := checkin(string(rune('a'+i))+"0", tt.fence)
			d, err := sl.st.Desktop("d")
			if err != nil {
				t.Fatal(err)
			}
			if v.Conflict != tt.conflict || (d.Head == v.N) == tt.conflict {
				t.Errorf("version %d (kind %s), head %d: want conflict %v", v.N, v.Kind, d.Head, tt.conflict)
			}
		})
	}
}
