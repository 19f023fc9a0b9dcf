package main

import "github.com/spf13/cobra"

func newDiskCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "disk",
		Short: "Inspect, create, read and write disk images (the qemu-img/qemu-io of cvd)",
	}
	return c
}
