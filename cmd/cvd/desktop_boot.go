package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/images"
)

func newDesktopBootCommand(g *globalOptions) *cobra.Command {
	var kernel, initrd string
	var clear bool
	b := &images.DesktopBoot{}
	c := &cobra.Command{
		Use:   "boot DESKTOP [--kernel F [--initrd F] --cmdline S] [--memory MIB] [--vcpus N] [--nics 0|1]",
		Short: "Set how a desktop boots on every device (part of its record: it travels with it)",
		Long: `Set a desktop's boot configuration: a direct kernel boot (--kernel, --initrd,
--cmdline; the files are copied into the store under their SHA-256) or a boot
from its system disk, memory, vCPUs and network interfaces. Every device of the
desktop's group gets it with the desktop and defines its VM from it with its own
identity (UUID, MAC, hostname, NoCloud seed), which is never synced. A device's
VM takes a changed configuration at its next start; between changes, what its
user edited in the VM (libvirt) stays.`,
		Example: `  cvd desktop boot alice --memory 4096 --vcpus 2 --nics 1
  cvd desktop boot lab --kernel vmlinuz --initrd initrd.img --cmdline "console=ttyS0 root=/dev/vda1"
  cvd desktop boot alice --clear`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, false)
			if err != nil {
				return err
			}
			defer st.Close()
			for _, f := range []struct {
				path string
				sum  *string
			}{{kernel, &b.Kernel}, {initrd, &b.Initrd}} {
				if f.path == "" {
					continue
				}
				r, err := os.Open(f.path)
				if err != nil {
					return &exitError{code: exitUsage, err: err}
				}
				*f.sum, err = st.AddBootFile(r, "", images.MaxBootFile)
				r.Close()
				if err != nil {
					return storeError(err)
				}
			}
			set := b
			if clear {
				set = nil
			}
			d, err := st.SetDesktopBoot(args[0], set)
			if err != nil {
				return storeError(err)
			}
			out := cmd.OutOrStdout()
			if g.json {
				return printJSON(out, d.Boot)
			}
			if d.Boot == nil {
				fmt.Fprintf(out, "desktop %s boots from its system disk with the defaults\n", d.Name)
				return nil
			}
			printBoot(out, d.Name, d.Boot)
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&kernel, "kernel", "", "kernel file for a direct kernel boot (copied into the store)")
	f.StringVar(&initrd, "initrd", "", "initrd file (copied into the store)")
	f.StringVar(&b.Cmdline, "cmdline", "", "kernel command line")
	f.UintVar(&b.MemoryMiB, "memory", 0, "memory in MiB (0: the hypervisor default)")
	f.UintVar(&b.VCPUs, "vcpus", 0, "virtual CPUs (0: the hypervisor default)")
	f.IntVar(&b.NICs, "nics", 0, "network interfaces (0 or 1)")
	f.BoolVar(&clear, "clear", false, "boot from the system disk with the defaults")
	return c
}

func printBoot(out io.Writer, name string, b *images.DesktopBoot) {
	fmt.Fprintf(out, "desktop %s boots", name)
	if b.Kernel != "" {
		fmt.Fprintf(out, " kernel %s", images.ShortID(b.Kernel))
		if b.Initrd != "" {
			fmt.Fprintf(out, " initrd %s", images.ShortID(b.Initrd))
		}
		fmt.Fprintf(out, " cmdline %q", b.Cmdline)
	} else {
		fmt.Fprint(out, " from its system disk")
	}
	fmt.Fprintf(out, ", %d MiB, %d vCPUs, %d NICs (0: defaults)\n", b.MemoryMiB, b.VCPUs, b.NICs)
}
