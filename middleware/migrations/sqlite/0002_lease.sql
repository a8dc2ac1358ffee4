-- tower-idempotency: attempts and recovery points of a lease (see `Lease::checkpoint`).
--
-- A takeover of the same request's lapsed lease counts one more attempt and inherits the
-- checkpoint; any other acquisition starts again at attempt 1 with none. Constant defaults:
-- existing rows read as first attempts without a checkpoint.

ALTER TABLE idempotency_records ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
-- The last checkpoint's name (NULL: none) and data, written only under the current lease token.
ALTER TABLE idempotency_records ADD COLUMN checkpoint_name TEXT;
ALTER TABLE idempotency_records ADD COLUMN checkpoint_data BLOB;
