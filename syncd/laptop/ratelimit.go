package laptop

import (
	"context"
	"net"

	"golang.org/x/time/rate"
)

// limitedConn paces a connection's reads and writes with a limiter that every
// connection of a Client shares: a laptop on a shared link caps what cvd takes
// of it (ClientOptions.RateLimit).
type limitedConn struct {
	net.Conn
	lim *rate.Limiter
}

// pace is the most bytes one read or write moves before it waits for tokens.
const pace = 32 << 10

func (c *limitedConn) Read(b []byte) (int, error) {
	if len(b) > pace {
		b = b[:pace]
	}
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.lim.WaitN(context.Background(), n)
	}
	return n, err
}

func (c *limitedConn) Write(b []byte) (int, error) {
	var done int
	for len(b) > 0 {
		chunk := b[:min(len(b), pace)]
		if err := c.lim.WaitN(context.Background(), len(chunk)); err != nil {
			return done, err
		}
		n, err := c.Conn.Write(chunk)
		done += n
		if err != nil {
			return done, err
		}
		b = b[n:]
	}
	return done, nil
}

// limitDial wraps dial's connections in one limiter of bytesPerSec.
func limitDial(dial func(ctx context.Context, network, addr string) (net.Conn, error), bytesPerSec int64) func(ctx context.Context, network, addr string) (net.Conn, error) {
	lim := rate.NewLimiter(rate.Limit(bytesPerSec), pace)
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &limitedConn{Conn: c, lim: lim}, nil
	}
}
