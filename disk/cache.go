package disk

import (
	"container/list"
	"sync"
)

// tableCache holds recently used metadata tables (L2 tables, refcount blocks) by
// host offset, least recently used first out. Entries are write-through: the cache
// never holds data the file lacks, so eviction just forgets.
type tableCache struct {
	mu    sync.Mutex
	max   int
	ll    *list.List
	items map[int64]*list.Element
}

type cacheEntry struct {
	off int64
	buf []byte
}

func newTableCache(max int) *tableCache {
	if max < 4 {
		max = 4
	}
	return &tableCache{max: max, ll: list.New(), items: make(map[int64]*list.Element)}
}

func (c *tableCache) get(off int64) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[off]; ok {
		c.ll.MoveToFront(e)
		return e.Value.(*cacheEntry).buf
	}
	return nil
}

func (c *tableCache) put(off int64, buf []byte) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[off]; ok {
		// Another reader loaded it first: keep one copy so writers see one slice.
		c.ll.MoveToFront(e)
		return e.Value.(*cacheEntry).buf
	}
	c.items[off] = c.ll.PushFront(&cacheEntry{off, buf})
	for c.ll.Len() > c.max {
		last := c.ll.Back()
		c.ll.Remove(last)
		delete(c.items, last.Value.(*cacheEntry).off)
	}
	return buf
}

func (c *tableCache) drop(off int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[off]; ok {
		c.ll.Remove(e)
		delete(c.items, off)
	}
}
