-- tower-idempotency: mark leases that a process waits for (a template, like 0001).
--
-- `watch` sets the flag; `complete` and `release` send NOTIFY only for flagged rows, so requests
-- nobody waits for never take NOTIFY's global commit lock. A constant default makes this a
-- metadata-only change: existing rows are not rewritten.

ALTER TABLE "{{schema}}"."{{table}}" ADD COLUMN IF NOT EXISTS watched boolean NOT NULL DEFAULT false;
