package syncd

import (
	"context"
	"errors"
	"fmt"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// mergeUserFiles merges, by files, the user disk of conflict version v (a
// check-in that did not start from the head) with the head's, when both
// changed it since the layer the check-in started from: the seed's Table 1
// from the checking-in device's side (desktop.SyncMergeLayers). The merged
// version becomes the head; its system disk is the check-in's when that one
// stood on the head's, else the head's. It returns nil, nil when there is
// nothing to merge (the user disk changed on one side only), and an error
// when the disks cannot be merged by files (no ext4 on them, no writer here):
// the check-in then stays a conflict version, as before.
func (s *Server) mergeUserFiles(ctx context.Context, name string, dev *Device, v *proto.Version, push *desktop.Push) (*proto.MergeResult, error) {
	if push == nil || push.User == nil || v.User == "" {
		return nil, nil
	}
	d, err := s.store.Desktop(name)
	if err != nil {
		return nil, err
	}
	head := d.HeadVersion()
	base := *push.User
	if head == nil || base == "" || head.User == base || head.User == v.User || head.User == "" {
		return nil, nil
	}
	other := head.Device
	if other == "" {
		other = "server"
	}
	um, err := desktop.SyncMergeLayers(ctx, s.store, base, v.User, head.User, other, head.Created)
	if err != nil {
		if errors.Is(err, files.ErrNoFileSystem) {
			return nil, fmt.Errorf("not mergeable by files: %w", err)
		}
		return nil, err
	}
	sys := head.System
	if push.System != nil && *push.System == head.System {
		sys = v.System
	}
	mv := proto.Version{Created: s.now().UTC().Truncate(1e9), From: head.N, System: sys, User: um.Layer,
		Kind: images.VersionMerge, Device: dev.Name,
		Note: fmt.Sprintf("merge of user files: version %d (%s) with %d (%s)", v.N, dev.Name, head.N, other)}
	_, added, err := addVersion(s.store, name, mv, true, 0, nil)
	if err != nil {
		return nil, err
	}
	mr := &proto.MergeResult{Version: added.N, Resolutions: []proto.MergeResolution{}}
	for _, p := range um.Plans {
		for _, r := range p.Plan.Resolutions {
			mr.Resolutions = append(mr.Resolutions, proto.MergeResolution{Path: r.Path, Case: r.Case, Action: r.Action, Copy: r.Copy})
		}
		mr.Fsck = append(mr.Fsck, p.Applied.Fsck)
	}
	s.log.Info("check-in: user files merged", "desktop", name, "device", dev.Name, "conflict", v.N, "head", head.N,
		"merged", added.N, "paths", len(mr.Resolutions))
	return mr, nil
}
