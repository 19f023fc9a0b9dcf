package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/syncd/laptop"
)

// serverFlags name a server of the site and this machine's token on it.
type serverFlags struct {
	server, token, caCert, bwlimit string
}

func (f *serverFlags) add(c *cobra.Command, what string) {
	fl := c.Flags()
	fl.StringVar(&f.server, "server", os.Getenv("CVD_SERVER"), what+" (env CVD_SERVER)")
	fl.StringVar(&f.token, "token", "", "this machine's token from `cvd device add` (env CVD_TOKEN)")
	fl.StringVar(&f.caCert, "ca-cert", "", "PEM file of a CA to trust for an https server")
	fl.StringVar(&f.bwlimit, "bwlimit", "", "cap the bytes per second moved, e.g. 100M (default: no cap)")
}

// client is a client of the server the flags name.
func (f *serverFlags) client() (*laptop.Client, error) {
	if f.server == "" {
		return nil, &exitError{code: exitUsage, err: fmt.Errorf("give --server (or CVD_SERVER)")}
	}
	if f.token == "" {
		f.token = os.Getenv("CVD_TOKEN")
	}
	if f.token == "" {
		return nil, &exitError{code: exitUsage, err: fmt.Errorf("give --token (or CVD_TOKEN) with --server")}
	}
	limit, err := parseRate(f.bwlimit)
	if err != nil {
		return nil, err
	}
	c, err := laptop.NewClient(f.server, f.token, laptop.ClientOptions{CACert: f.caCert, RateLimit: limit})
	if err != nil {
		return nil, &exitError{code: exitUsage, err: err}
	}
	return c, nil
}

// pull fetches the desktop's head layers from the server into the store (see
// laptop.Laptop.Pull).
func (f *serverFlags) pull(ctx context.Context, g *globalOptions, desktop string, errOut io.Writer) (*laptop.CheckoutReport, error) {
	c, err := f.client()
	if err != nil {
		return nil, err
	}
	lp, done, err := openLaptop(g, errOut)
	if err != nil {
		return nil, err
	}
	defer done()
	rep, err := lp.Pull(ctx, c, desktop)
	if err != nil {
		return nil, storeError(err)
	}
	return rep, nil
}

func newPullCommand(g *globalOptions) *cobra.Command {
	f := &serverFlags{}
	c := &cobra.Command{
		Use:   "pull DESKTOP --server URL --token T",
		Short: "Fetch a desktop's sealed layers from a server of the site, for cloning here",
		Long: `Pull a desktop onto this hypervisor host's store: the layers of the server's
head version (base, apps, versions) that the store lacks are fetched by ID as
compressed, digest-checked cluster streams, without a lease (sealed layers never
change), and a local desktop of the same name stands on them. Clone or provision
it here afterwards. A second pull of the same head moves no layer bytes; after
the head moved, only the new layers come.

The token is a host's: cvd device add NAME --host on the server.`,
		Example: `  cvd pull alice --server https://cvd.example:8470 --token "$HOST_TOKEN"
  cvd provision alice --count 20 --server https://cvd.example:8470 --token "$HOST_TOKEN"`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rep, err := f.pull(cmd.Context(), g, args[0], cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if g.json {
				return printJSON(out, rep)
			}
			printPull(out, rep)
			return nil
		},
	}
	f.add(c, "server URL, http(s)://HOST:PORT")
	return c
}

func printPull(out io.Writer, rep *laptop.CheckoutReport) {
	fmt.Fprintf(out, "pulled %s version %d from %s: %d layers fetched (%s received), %d already held, in %.2fs\n",
		rep.Desktop, rep.Version, rep.Server, len(rep.LayersFetched), fmtBytes(rep.Bytes), len(rep.LayersHeld), rep.Took)
}
