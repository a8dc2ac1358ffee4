-- pgbench custom script: the two statements PostgresStore runs for one new-key request, as
-- written in middleware/src/store/postgres/statements.rs (Statements::new): `begin` (which inserts the
-- lease and returns its token) and `complete` (which stores the response under that token and,
-- only for a watched row, NOTIFYs). One pgbench transaction = one new-key request's worth of store work.
-- These are the store's single-request statements: under concurrency the store merges calls into
-- batch statements (middleware/src/store/postgres/batch.rs); this script is the one-transaction-per-request
-- baseline that issue 14's target is measured against.
--
-- Differences from the proxy, kept as small as pgbench allows: the key is sha256 of a random
-- bigint computed in SQL (pgbench variables are numbers), the fingerprint and the stored
-- response (@RESPONSE_BYTES@ bytes, the size of the encoded upstream response) are constants,
-- and the NOTIFY channel is one nobody listens on (NOTIFY only runs for a row a waiter marked
-- `watched`, which no row here is, as in the proxy's new-key runs). Keep this file in step with
-- the statements when they change. bench/run fills in @TABLE@, @CHANNEL@ and
-- @RESPONSE_BYTES@ and runs it with `pgbench -n -M prepared` (sqlx prepares its statements too).
\set k random(1, 9000000000000000000)
\set lock_ttl 30000000
\set ttl 3600000000
WITH existing AS ( SELECT fingerprint = decode(repeat('07', 32), 'hex') AS same_request, response IS NULL AS in_flight, CASE WHEN fingerprint = decode(repeat('07', 32), 'hex') THEN response END AS response, (extract(epoch FROM expires_at - now()) * 1000000)::bigint AS expires_in FROM @TABLE@ WHERE key = sha256(int8send(:k)) AND expires_at > now() ), acquired AS ( INSERT INTO @TABLE@ AS r (key, fingerprint, response, expires_at) SELECT sha256(int8send(:k)), decode(repeat('07', 32), 'hex'), NULL, now() + :lock_ttl::bigint * interval '1 microsecond' WHERE NOT EXISTS (SELECT FROM existing) ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, token = excluded.token, response = NULL, expires_at = excluded.expires_at, attempt = CASE WHEN r.response IS NULL AND r.fingerprint = excluded.fingerprint THEN r.attempt + 1 ELSE 1 END, checkpoint_name = CASE WHEN r.response IS NULL AND r.fingerprint = excluded.fingerprint THEN r.checkpoint_name END, checkpoint_data = CASE WHEN r.response IS NULL AND r.fingerprint = excluded.fingerprint THEN r.checkpoint_data END WHERE r.expires_at <= now() RETURNING r.token, r.attempt::bigint AS attempt, r.checkpoint_name, r.checkpoint_data ) SELECT acquired.token AS token, existing.same_request, existing.in_flight, existing.response, acquired.attempt, acquired.checkpoint_name, acquired.checkpoint_data, existing.expires_in FROM (SELECT) AS one LEFT JOIN acquired ON true LEFT JOIN existing ON true
\gset b_
WITH completed AS ( UPDATE @TABLE@ SET response = convert_to(repeat('x', @RESPONSE_BYTES@), 'UTF8'), expires_at = now() + :ttl::bigint * interval '1 microsecond' WHERE key = sha256(int8send(:k)) AND token = :b_token AND response IS NULL RETURNING key, watched ) SELECT CASE WHEN watched THEN (SELECT 1 FROM pg_notify('@CHANNEL@', encode(completed.key, 'hex'))) ELSE 1 END FROM completed;
