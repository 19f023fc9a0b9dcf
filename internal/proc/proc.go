// Package proc tells whether the process that left a record or a temporary file
// behind still runs, so that one process's recovery never removes the work of
// another process of the same store.
//
// # Words
//
//   - Owner: host name, PID and start time (clock ticks since boot, from
//     /proc/PID/stat) of a process. A PID alone is reused; the triple is not.
//   - Temporary name: ".tmp-<pid>.<start>-…", the prefix of every file or
//     directory cvd writes before it is committed. A temporary name without an
//     owner (an earlier release's) belongs to no running process.
package proc

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// Owner identifies a process.
type Owner struct {
	Host  string `json:"host,omitempty"`
	PID   int    `json:"pid"`
	Start uint64 `json:"start,omitempty"`
}

var self = func() Owner {
	h, _ := os.Hostname()
	pid := os.Getpid()
	return Owner{Host: h, PID: pid, Start: startTime(pid)}
}()

// Self is this process.
func Self() Owner { return self }

// startTime is field 22 of /proc/PID/stat, 0 when unreadable.
func startTime(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
}

// Alive reports whether o still runs. An owner on another host is taken as
// alive (this host cannot tell); a zero start time matches any process with
// that PID.
func (o Owner) Alive() bool {
	if o.PID <= 0 {
		return false
	}
	if o.Host != "" && o.Host != self.Host {
		return true
	}
	if err := syscall.Kill(o.PID, 0); err != nil && err != syscall.EPERM {
		return false
	}
	return o.Start == 0 || startTime(o.PID) == o.Start
}

// TempPrefix is the start of this process's temporary names.
func TempPrefix() string { return fmt.Sprintf(".tmp-%d.%d-", self.PID, self.Start) }

// TempOwner parses the owner out of a temporary name; ok is false for a name
// without one.
func TempOwner(name string) (o Owner, ok bool) {
	rest, found := strings.CutPrefix(name, ".tmp-")
	if !found {
		return o, false
	}
	head, _, found := strings.Cut(rest, "-")
	if !found {
		return o, false
	}
	pid, start, found := strings.Cut(head, ".")
	if !found {
		return o, false
	}
	p, err1 := strconv.Atoi(pid)
	s, err2 := strconv.ParseUint(start, 10, 64)
	if err1 != nil || err2 != nil {
		return o, false
	}
	return Owner{Host: self.Host, PID: p, Start: s}, true
}

// TempAlive reports whether the temporary name belongs to a running process.
func TempAlive(name string) bool {
	o, ok := TempOwner(name)
	return ok && o.Alive()
}
