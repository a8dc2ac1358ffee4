-- tower-idempotency: the forget log, through which a forget reaches every process using the file.
--
-- A process answering replays from its in-process cache must drop a record forgotten on purpose
-- by another process (`idempotency-proxy records forget` runs apart from the proxy). SQLite has
-- no notification channel between processes, so every delete of a live completed record is
-- logged here, by a trigger, in the deleting transaction; each process reads the rows after the
-- last one it saw (see `sqlite_records.rs`). The reaper deletes rows older than ten minutes; a
-- reader that finds a hole in `seq` (rows deleted before it read them) treats every cached record
-- as possibly forgotten. Expired rows (the reaper's deletes) and leases (`release`) are not
-- logged: no cache holds them.

CREATE TABLE idempotency_forgets (
    -- AUTOINCREMENT: never reused, and allocated in commit order (SQLite has one writer).
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key BLOB NOT NULL,
    -- Unix milliseconds.
    forgotten_at INTEGER NOT NULL
);

CREATE TRIGGER idempotency_forget_logged
AFTER DELETE ON idempotency_records
WHEN old.response IS NOT NULL
    AND old.expires_at > CAST(unixepoch('subsec') * 1000 AS INTEGER)
BEGIN
    INSERT INTO idempotency_forgets (key, forgotten_at)
    VALUES (old.key, CAST(unixepoch('subsec') * 1000 AS INTEGER));
END;
