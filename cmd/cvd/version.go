package main

import (
	"fmt"
	"runtime"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/catalog"
)

// version is set at build time (make build: git describe); "dev" otherwise.
var version = "dev"

type versionInfo struct {
	Version       string `json:"version"`
	Go            string `json:"go"`
	Platform      string `json:"platform"`
	CatalogSchema int64  `json:"catalog_schema"`
}

func newVersionCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print cvd's version, the Go release it was built with, and its catalog schema",
		Example: "  cvd version\n  cvd version --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			v := versionInfo{Version: version, Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH,
				CatalogSchema: catalog.Version()}
			if g.json {
				return printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "cvd %s (%s, %s; catalog schema %d)\n", v.Version, v.Go, v.Platform, v.CatalogSchema)
			return nil
		},
	}
}
