package proc

import (
	"os/exec"
	"testing"
)

func TestOwner(t *testing.T) {
	if !Self().Alive() {
		t.Fatal("this process is not alive")
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := Owner{PID: cmd.Process.Pid, Host: Self().Host}
	if dead.Alive() {
		t.Errorf("exited process %d is alive", dead.PID)
	}
	reused := Self()
	reused.Start++
	if reused.Alive() {
		t.Error("a PID with another start time is alive")
	}
	tests := []struct {
		name  string
		alive bool
	}{
		{TempPrefix() + "x.qcow2", true},
		{".tmp-1a2b3c4d.qcow2", false},
		{".tmp-seed-123", false},
		{"layer.qcow2", false},
		{".tmp-999999999.1-x", false},
	}
	for _, tt := range tests {
		if got := TempAlive(tt.name); got != tt.alive {
			t.Errorf("TempAlive(%q) = %v, want %v", tt.name, got, tt.alive)
		}
	}
}
