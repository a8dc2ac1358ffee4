-- tower-idempotency: the SQLite records table. `SqliteStore` applies this itself on connect;
-- sqlx records it in the table `idempotency_migrations` (not `_sqlx_migrations`, so the
-- database file can also hold an application's own sqlx-migrated tables).

CREATE TABLE IF NOT EXISTS idempotency_records (
    -- sha256(scope || idempotency key).
    key         BLOB    NOT NULL PRIMARY KEY,
    -- sha256 of the request that holds or held the key.
    fingerprint BLOB    NOT NULL,
    -- Fencing token of the lease, from idempotency_tokens.
    token       INTEGER NOT NULL,
    -- NULL while the request is in flight; the encoded StoredResponse once it completed.
    response    BLOB,
    -- Unix time in milliseconds. In flight: when the lease ends unless renewed. Completed: when
    -- the record ends. A row whose expires_at has passed is treated as absent by every read.
    expires_at  INTEGER NOT NULL
);

-- The reaper finds expired rows through this index.
CREATE INDEX IF NOT EXISTS idempotency_records_expires_at_idx
    ON idempotency_records (expires_at);

-- The last lease token issued. One counter for every key, never reset, so a token is larger
-- than every token issued before it even after the row that held the older one was deleted.
CREATE TABLE IF NOT EXISTS idempotency_tokens (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);

INSERT INTO idempotency_tokens (id, last) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
