package clone

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"

	"github.com/diskfs/go-diskfs/backend/file"
	"github.com/diskfs/go-diskfs/filesystem/iso9660"
)

// SeedLabel is the volume label cloud-init's NoCloud datasource looks for.
const SeedLabel = "cidata"

// SeedFiles returns the NoCloud meta-data and user-data of an identity.
func SeedFiles(id Identity) (metaData, userData []byte) {
	metaData = fmt.Appendf(nil, "instance-id: %s\nlocal-hostname: %s\n", id.UUID, id.Hostname)
	userData = fmt.Appendf(nil, "#cloud-config\nhostname: %s\npreserve_hostname: false\n", id.Hostname)
	return metaData, userData
}

// WriteSeed writes a cloud-init NoCloud seed image at path (which must not exist):
// ISO 9660 with Rock Ridge names, volume label "cidata", files meta-data and
// user-data. workDir is where go-diskfs stages the files (a fresh directory is
// made inside it and removed); the file is not synced.
func WriteSeed(path, workDir string, id Identity) (err error) {
	ws, err := os.MkdirTemp(workDir, ".tmp-seed-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(ws)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer func() {
		if err2 := f.Close(); err == nil {
			err = err2
		}
		if err != nil {
			os.Remove(path)
			err = fmt.Errorf("seed image %s: %w", filepath.Base(path), err)
		}
	}()
	fs, err := iso9660.Create(file.New(f, false), 0, 0, 2048, ws)
	if err != nil {
		return err
	}
	meta, user := SeedFiles(id)
	for _, e := range []struct {
		name string
		data []byte
	}{{"/meta-data", meta}, {"/user-data", user}} {
		w, err := fs.OpenFile(e.name, os.O_CREATE|os.O_RDWR)
		if err != nil {
			return err
		}
		_, err = w.Write(e.data)
		if err2 := w.Close(); err == nil {
			err = err2
		}
		if err != nil {
			return fmt.Errorf("%s: %w", e.name, err)
		}
	}
	if err := fs.Finalize(iso9660.FinalizeOptions{RockRidge: true, Joliet: true, VolumeIdentifier: SeedLabel}); err != nil {
		return err
	}
	// go-diskfs ends the file after the last byte of the last file; a loop device
	// sees whole 512-byte sectors only, so pad to the volume size the primary
	// volume descriptor declares (whole 2048-byte blocks).
	var pvd [4]byte
	if _, err := f.ReadAt(pvd[:], 16*2048+80); err != nil {
		return fmt.Errorf("read volume size: %w", err)
	}
	blocks := int64(binary.LittleEndian.Uint32(pvd[:]))
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if want := blocks * 2048; fi.Size() < want {
		return f.Truncate(want)
	}
	return nil
}
