package hypervisor

import (
	"context"
	"fmt"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
)

// EventKind is the kind of a lifecycle event.
type EventKind string

// Lifecycle event kinds (libvirt's virDomainEventType).
const (
	EventDefined     EventKind = "defined"
	EventUndefined   EventKind = "undefined"
	EventStarted     EventKind = "started"
	EventSuspended   EventKind = "suspended"
	EventResumed     EventKind = "resumed"
	EventStopped     EventKind = "stopped"
	EventShutdown    EventKind = "shutdown" // the guest is shutting down / has shut down
	EventPMSuspended EventKind = "pmsuspended"
	EventCrashed     EventKind = "crashed"
)

var eventKinds = map[libvirt.DomainEventType]EventKind{
	libvirt.DomainEventDefined: EventDefined, libvirt.DomainEventUndefined: EventUndefined,
	libvirt.DomainEventStarted: EventStarted, libvirt.DomainEventSuspended: EventSuspended,
	libvirt.DomainEventResumed: EventResumed, libvirt.DomainEventStopped: EventStopped,
	libvirt.DomainEventShutdown: EventShutdown, libvirt.DomainEventPmsuspended: EventPMSuspended,
	libvirt.DomainEventCrashed: EventCrashed,
}

// Event is a lifecycle event of one domain.
type Event struct {
	Domain string
	UUID   string
	Kind   EventKind
	// Detail is libvirt's detail code for the kind (e.g. for EventStopped:
	// 0 shutdown, 1 destroyed, 2 crashed, ...).
	Detail int
}

func (e Event) String() string { return fmt.Sprintf("%s %s (detail %d)", e.Domain, e.Kind, e.Detail) }

// maxQueuedEvents bounds the events held for a reader that does not keep up;
// beyond it the oldest are dropped.
const maxQueuedEvents = 4096

// Events streams the lifecycle events of every domain until ctx ends; then the
// channel is closed. It also closes if the connection to libvirtd is lost.
//
// go-libvirt's event subscription has two hazards. Cancelling its context while
// events still arrive wedges the whole connection: the forwarding goroutine shuts
// its stream down, the socket reader blocks pushing the next event into it, and
// the deregistration call waits for a reply that reader will never deliver
// (upstream issue #191; TestEventsRawGoLibvirtControl reproduces it here within a
// few rounds). And a LifecycleEvents channel nobody drains pins its forwarding
// goroutine on a send where it cannot see the cancel, so the subscription is never
// torn down and its queue grows without bound (in this go-libvirt version other
// calls on the connection still answer). Events avoids both: it
// subscribes on a connection of its own (never the one c uses), always drains
// go-libvirt's channel into a bounded queue whether or not the caller reads, and
// at the end disconnects first and cancels the subscription after. A caller that
// stops reading only loses events (beyond maxQueuedEvents); it never blocks
// libvirt or c.
func (c *Conn) Events(ctx context.Context) (<-chan Event, error) {
	const op = "events"
	l, err := dial(ctx, c.target)
	if err != nil {
		return nil, err
	}
	subCtx, subCancel := context.WithCancel(context.Background())
	type sub struct {
		ch  <-chan libvirt.DomainEventLifecycleMsg
		err error
	}
	got := make(chan sub, 1)
	go func() {
		ch, err := l.LifecycleEvents(subCtx)
		got <- sub{ch, err}
	}()
	var raw <-chan libvirt.DomainEventLifecycleMsg
	select {
	case s := <-got:
		if s.err != nil {
			closeEvents(l, nil, subCancel)
			return nil, wrap(op, "", s.err)
		}
		raw = s.ch
	case <-ctx.Done():
		go func() {
			s := <-got
			closeEvents(l, s.ch, subCancel)
		}()
		return nil, &Error{Op: op, Err: ctx.Err()}
	}
	out := make(chan Event)
	go pumpEvents(ctx, l, raw, subCancel, out)
	return out, nil
}

// pumpEvents moves events from go-libvirt's channel to out, queueing them for a
// slow reader, until ctx ends or the connection is lost.
func pumpEvents(ctx context.Context, l *libvirt.Libvirt, raw <-chan libvirt.DomainEventLifecycleMsg,
	subCancel context.CancelFunc, out chan<- Event) {
	defer close(out)
	var queue []Event
	for {
		var send chan<- Event
		var next Event
		if len(queue) > 0 {
			send, next = out, queue[0]
		}
		select {
		case m, ok := <-raw:
			if !ok {
				closeEvents(l, nil, subCancel)
				return
			}
			if len(queue) >= maxQueuedEvents {
				queue = queue[1:]
			}
			queue = append(queue, Event{
				Domain: m.Dom.Name,
				UUID:   fmt.Sprintf("%x-%x-%x-%x-%x", m.Dom.UUID[0:4], m.Dom.UUID[4:6], m.Dom.UUID[6:8], m.Dom.UUID[8:10], m.Dom.UUID[10:16]),
				Kind:   eventKind(m.Event),
				Detail: int(m.Detail),
			})
		case send <- next:
			queue = queue[1:]
		case <-ctx.Done():
			closeEvents(l, raw, subCancel)
			return
		}
	}
}

func eventKind(e int32) EventKind {
	if k, ok := eventKinds[libvirt.DomainEventType(e)]; ok {
		return k
	}
	return EventKind(fmt.Sprintf("event %d", e))
}

// closeEvents ends a subscription in the only order that cannot deadlock: keep
// draining raw, disconnect (go-libvirt then shuts the stream down and closes
// raw), and only then cancel the subscription's context. Bounded in time: a
// libvirtd that does not answer is abandoned.
func closeEvents(l *libvirt.Libvirt, raw <-chan libvirt.DomainEventLifecycleMsg, subCancel context.CancelFunc) {
	drained := make(chan struct{})
	go func() {
		if raw != nil {
			for range raw {
			}
		}
		close(drained)
	}()
	done := make(chan struct{})
	go func() {
		_ = l.Disconnect()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
	subCancel()
	select {
	case <-drained:
	case <-time.After(10 * time.Second):
	}
}
