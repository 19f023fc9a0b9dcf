package catalog

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Tx is one transaction. A read error is kept (the first one) and returned by the
// View or Update that ran the transaction, so Get can stay a one-value call.
type Tx struct {
	db       *DB
	tx       *sql.Tx
	ctx      context.Context
	writable bool
	err      error
	stmts    map[string]*sql.Stmt // prepared once per transaction (closed with it)
	onCommit []func()
}

// OnCommit runs fn after the transaction commits (not when it rolls back).
func (tx *Tx) OnCommit(fn func()) { tx.onCommit = append(tx.onCommit, fn) }

// stmt is the transaction's prepared statement for query ("?" placeholders).
func (tx *Tx) stmt(query string) (*sql.Stmt, error) {
	if st := tx.stmts[query]; st != nil {
		return st, nil
	}
	st, err := tx.tx.PrepareContext(tx.ctx, tx.q(query))
	if err != nil {
		return nil, err
	}
	if tx.stmts == nil {
		tx.stmts = map[string]*sql.Stmt{}
	}
	tx.stmts[query] = st
	return st, nil
}

func (tx *Tx) exec(query string, args ...any) (sql.Result, error) {
	st, err := tx.stmt(query)
	if err != nil {
		return nil, err
	}
	return st.ExecContext(tx.ctx, args...)
}

// scan runs a one-row query and scans it into dest (sql.ErrNoRows when none).
func (tx *Tx) scan(query string, args []any, dest ...any) error {
	st, err := tx.stmt(query)
	if err != nil {
		return err
	}
	return st.QueryRowContext(tx.ctx, args...).Scan(dest...)
}

// Writable reports whether tx may write.
func (tx *Tx) Writable() bool { return tx.writable }

func (tx *Tx) fail(err error) error {
	if tx.err == nil {
		tx.err = err
	}
	return err
}

// q rewrites "?" placeholders for PostgreSQL ("$1", "$2", …).
func (tx *Tx) q(query string) string {
	if tx.db.engine != Postgres {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// Bucket is the named bucket; buckets exist as soon as they hold a record.
func (tx *Tx) Bucket(name []byte) *Bucket { return &Bucket{tx: tx, name: string(name)} }

// Bucket is a key-ordered set of records within a transaction.
type Bucket struct {
	tx   *Tx
	name string
}

// Name is the bucket's name.
func (b *Bucket) Name() string { return b.name }

// Get returns the value at key, or nil when there is none (a record with an empty
// value is an empty, non-nil slice).
func (b *Bucket) Get(key []byte) []byte {
	var v []byte
	err := b.tx.scan("SELECT v FROM kv WHERE b = ? AND k = ?", []any{b.name, key}, &v)
	if errors.Is(err, sql.ErrNoRows) {
		return nil
	}
	if err != nil {
		b.tx.fail(fmt.Errorf("catalog: get %s/%q: %w", b.name, key, err))
		return nil
	}
	if v == nil {
		v = []byte{}
	}
	return v
}

// Put sets the value at key.
func (b *Bucket) Put(key, value []byte) error {
	if !b.tx.writable {
		return ErrReadOnly
	}
	if value == nil {
		value = []byte{}
	}
	_, err := b.tx.exec("INSERT INTO kv (b, k, v) VALUES (?, ?, ?) ON CONFLICT (b, k) DO UPDATE SET v = excluded.v",
		b.name, key, value)
	if err != nil {
		return b.tx.fail(fmt.Errorf("catalog: put %s/%q: %w", b.name, key, err))
	}
	return nil
}

// PutIfAbsent sets the value at key unless the bucket holds the key already, and
// reports whether it did (one statement: the first writer of a key wins).
func (b *Bucket) PutIfAbsent(key, value []byte) (bool, error) {
	if !b.tx.writable {
		return false, ErrReadOnly
	}
	if value == nil {
		value = []byte{}
	}
	res, err := b.tx.exec("INSERT INTO kv (b, k, v) VALUES (?, ?, ?) ON CONFLICT (b, k) DO NOTHING", b.name, key, value)
	if err != nil {
		return false, b.tx.fail(fmt.Errorf("catalog: put %s/%q: %w", b.name, key, err))
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// Record is a key and its value, for the batch writes.
type Record struct{ K, V []byte }

// batchRows is how many records one statement of a batch write carries.
const batchRows = 256

// GetAll returns the values at keys, in the order of keys (nil where the bucket
// holds no record), a few hundred keys per query.
func (b *Bucket) GetAll(keys [][]byte) ([][]byte, error) {
	out := make([][]byte, len(keys))
	at := make(map[string][]int, len(keys))
	for i, k := range keys {
		at[string(k)] = append(at[string(k)], i)
	}
	for start := 0; start < len(keys); start += batchRows {
		chunk := keys[start:min(start+batchRows, len(keys))]
		q := "SELECT k, v FROM kv WHERE b = ? AND k IN (?" + strings.Repeat(", ?", len(chunk)-1) + ")"
		args := make([]any, 0, 1+len(chunk))
		args = append(args, b.name)
		for _, k := range chunk {
			args = append(args, k)
		}
		err := b.tx.Query(q, args, func(scan func(dest ...any) error) error {
			var k, v []byte
			if err := scan(&k, &v); err != nil {
				return err
			}
			if v == nil {
				v = []byte{}
			}
			for _, i := range at[string(k)] {
				out[i] = v
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("catalog: get %d records of %s: %w", len(chunk), b.name, err)
		}
	}
	return out, nil
}

// PutAll sets every record, a few hundred per statement; of records with the
// same key, the last one wins.
func (b *Bucket) PutAll(recs []Record) error {
	// One statement may not update a row twice (PostgreSQL): keep the last.
	last := make(map[string]int, len(recs))
	for i, r := range recs {
		last[string(r.K)] = i
	}
	if len(last) < len(recs) {
		var uniq []Record
		for i, r := range recs {
			if last[string(r.K)] == i {
				uniq = append(uniq, r)
			}
		}
		recs = uniq
	}
	_, err := b.putBatch(recs, "DO UPDATE SET v = excluded.v")
	return err
}

// PutAllIfAbsent sets the records whose keys the bucket does not hold yet, a few
// hundred per statement, and returns how many it set: fewer than len(recs) means
// some keys were taken (the first writer of a key wins).
func (b *Bucket) PutAllIfAbsent(recs []Record) (int, error) {
	return b.putBatch(recs, "DO NOTHING")
}

func (b *Bucket) putBatch(recs []Record, onConflict string) (int, error) {
	if !b.tx.writable {
		return 0, ErrReadOnly
	}
	n := 0
	for len(recs) > 0 {
		chunk := recs[:min(batchRows, len(recs))]
		recs = recs[len(chunk):]
		var q strings.Builder
		q.WriteString("INSERT INTO kv (b, k, v) VALUES ")
		args := make([]any, 0, 3*len(chunk))
		for i, r := range chunk {
			if i > 0 {
				q.WriteString(", ")
			}
			q.WriteString("(?, ?, ?)")
			v := r.V
			if v == nil {
				v = []byte{}
			}
			args = append(args, b.name, r.K, v)
		}
		q.WriteString(" ON CONFLICT (b, k) " + onConflict)
		res, err := b.tx.exec(q.String(), args...)
		if err != nil {
			return n, b.tx.fail(fmt.Errorf("catalog: put %d records in %s: %w", len(chunk), b.name, err))
		}
		m, err := res.RowsAffected()
		if err != nil {
			return n, err
		}
		n += int(m)
	}
	return n, nil
}

// Delete removes the record at key (none is fine).
func (b *Bucket) Delete(key []byte) error {
	if !b.tx.writable {
		return ErrReadOnly
	}
	if _, err := b.tx.exec("DELETE FROM kv WHERE b = ? AND k = ?", b.name, key); err != nil {
		return b.tx.fail(fmt.Errorf("catalog: delete %s/%q: %w", b.name, key, err))
	}
	return nil
}

// ForEach calls fn for every record in key order; an error from fn stops it.
// fn may not change the bucket.
func (b *Bucket) ForEach(fn func(k, v []byte) error) error {
	c := b.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if err := fn(k, v); err != nil {
			return err
		}
	}
	return c.err
}

// KeysWith lists, in key order, the keys of the records whose value is v (a scan
// of the bucket inside the database: for small buckets, such as names).
func (b *Bucket) KeysWith(v []byte) ([][]byte, error) {
	var out [][]byte
	err := b.tx.Query("SELECT k FROM kv WHERE b = ? AND v = ? ORDER BY k", []any{b.name, v},
		func(scan func(dest ...any) error) error {
			var k []byte
			if err := scan(&k); err != nil {
				return err
			}
			out = append(out, k)
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("catalog: keys of %s: %w", b.name, err)
	}
	return out, nil
}

// Len counts the bucket's records.
func (b *Bucket) Len() (int, error) {
	var n int
	err := b.tx.scan("SELECT COUNT(*) FROM kv WHERE b = ?", []any{b.name}, &n)
	if err != nil {
		return 0, b.tx.fail(fmt.Errorf("catalog: count %s: %w", b.name, err))
	}
	return n, nil
}

// NextSequence returns the bucket's next sequence number (1, 2, …): numbers are
// never given twice, even by transactions that were rolled back later.
func (b *Bucket) NextSequence() (uint64, error) {
	if !b.tx.writable {
		return 0, ErrReadOnly
	}
	var n int64
	err := b.tx.scan("INSERT INTO seq (b, n) VALUES (?, 1) ON CONFLICT (b) DO UPDATE SET n = seq.n + 1 RETURNING n", []any{b.name}, &n)
	if err != nil {
		return 0, b.tx.fail(fmt.Errorf("catalog: sequence %s: %w", b.name, err))
	}
	return uint64(n), nil
}

// Cursor walks a bucket in key order, a page of records at a time (so memory stays
// bounded and the transaction's connection is free between pages).
type Cursor struct {
	b    *Bucket
	page []record
	i    int
	last []byte // the last key read from the database
	more bool
	err  error
}

type record struct{ k, v []byte }

// cursorPage is how many records a cursor reads at once.
const cursorPage = 512

// Cursor starts a cursor on the bucket.
func (b *Bucket) Cursor() *Cursor { return &Cursor{b: b} }

// First moves to the first record; a nil key means the bucket is empty.
func (c *Cursor) First() (k, v []byte) { return c.Seek(nil) }

// Seek moves to the first record whose key is at least key.
func (c *Cursor) Seek(key []byte) (k, v []byte) {
	if key == nil {
		key = []byte{}
	}
	c.page, c.i, c.more = nil, 0, true
	c.load(">=", key)
	return c.cur()
}

// Next moves to the following record; a nil key means the end.
func (c *Cursor) Next() (k, v []byte) {
	c.i++
	if c.i >= len(c.page) && c.more {
		c.load(">", c.last)
	}
	return c.cur()
}

func (c *Cursor) cur() ([]byte, []byte) {
	if c.i >= len(c.page) {
		return nil, nil
	}
	return c.page[c.i].k, c.page[c.i].v
}

func (c *Cursor) load(op string, from []byte) {
	c.page, c.i = c.page[:0], 0
	tx := c.b.tx
	st, err := tx.stmt("SELECT k, v FROM kv WHERE b = ? AND k " + op + " ? ORDER BY k LIMIT " + strconv.Itoa(cursorPage))
	if err != nil {
		c.stop(err)
		return
	}
	rows, err := st.QueryContext(tx.ctx, c.b.name, from)
	if err != nil {
		c.stop(err)
		return
	}
	defer rows.Close()
	for rows.Next() {
		var r record
		if err := rows.Scan(&r.k, &r.v); err != nil {
			c.stop(err)
			return
		}
		if r.v == nil {
			r.v = []byte{}
		}
		c.page = append(c.page, r)
	}
	if err := rows.Err(); err != nil {
		c.stop(err)
		return
	}
	c.more = len(c.page) == cursorPage
	if len(c.page) > 0 {
		c.last = c.page[len(c.page)-1].k
	}
}

func (c *Cursor) stop(err error) {
	c.page, c.more = nil, false
	c.err = c.b.tx.fail(fmt.Errorf("catalog: scan %s: %w", c.b.name, err))
}

// SetSequence sets the bucket's sequence (a migration carries it over).
func (b *Bucket) SetSequence(n uint64) error {
	if !b.tx.writable {
		return ErrReadOnly
	}
	_, err := b.tx.tx.ExecContext(b.tx.ctx,
		b.tx.q("INSERT INTO seq (b, n) VALUES (?, ?) ON CONFLICT (b) DO UPDATE SET n = excluded.n"), b.name, int64(n))
	if err != nil {
		return b.tx.fail(fmt.Errorf("catalog: set sequence %s: %w", b.name, err))
	}
	return nil
}

// Exec runs a statement on the schema's typed tables ("?" placeholders, rewritten
// for the engine; prepared once per transaction) and returns the rows it affected.
func (tx *Tx) Exec(query string, args ...any) (int64, error) {
	if !tx.writable {
		return 0, ErrReadOnly
	}
	res, err := tx.exec(query, args...)
	if err != nil {
		return 0, tx.fail(fmt.Errorf("catalog: %w", err))
	}
	return res.RowsAffected()
}

// Query runs a query on the schema's typed tables ("?" placeholders) and calls fn
// for each row with the function that scans it; an error from fn stops it. fn
// must not use tx: the row set holds the transaction's connection until the end.
func (tx *Tx) Query(query string, args []any, fn func(scan func(dest ...any) error) error) error {
	st, err := tx.stmt(query)
	if err != nil {
		return tx.fail(fmt.Errorf("catalog: %w", err))
	}
	rows, err := st.QueryContext(tx.ctx, args...)
	if err != nil {
		return tx.fail(fmt.Errorf("catalog: %w", err))
	}
	defer rows.Close()
	for rows.Next() {
		if err := fn(rows.Scan); err != nil {
			return err
		}
	}
	if err := rows.Err(); err != nil {
		return tx.fail(fmt.Errorf("catalog: %w", err))
	}
	return nil
}
