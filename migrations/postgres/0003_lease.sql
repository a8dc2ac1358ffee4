-- tower-idempotency: attempts and recovery points of a lease (a template, like 0001).
--
-- A takeover of the same request's lapsed lease counts one more attempt and inherits the
-- checkpoint; any other acquisition starts again at attempt 1 with none. Constant defaults make
-- this a metadata-only change: existing rows are not rewritten, and read as first attempts
-- without a checkpoint.

ALTER TABLE "{{schema}}"."{{table}}"
    ADD COLUMN IF NOT EXISTS attempt integer NOT NULL DEFAULT 1,
    -- The last checkpoint's name (NULL: none) and data, written only under the current token.
    ADD COLUMN IF NOT EXISTS checkpoint_name text,
    ADD COLUMN IF NOT EXISTS checkpoint_data bytea;
