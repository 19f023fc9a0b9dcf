// Package files reads the file systems inside a disk chain, in process and
// read-only: the partition table (GPT or MBR, or none), and each ext4 file
// system through go-diskfs on top of cvd's own chain reader (an adapter that
// makes a disk.Image a go-diskfs backend.Storage). A Manifest lists a file
// system's files with their type, mode, owner, size, modification time and,
// for regular files, their SHA-256; Diff compares two manifests.
//
// Nothing here writes: the Storage adapter refuses Writable, and an ext4 file
// system whose journal needs recovery is read as it stands on disk (as
// `debugfs -c` does), which is what a sealed version holds.
package files
