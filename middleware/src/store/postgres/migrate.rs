//! Applying the schema: the migration templates of `migrations/postgres` with the configured
//! names filled in, run by a sqlx migrator (see "Migrations" in the [`PostgresStore`] docs).

use sqlx::migrate::{Migration, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, SqlSafeStr};

use super::PostgresStore;
use crate::store::{StoreError, sql};

impl PostgresStore {
    /// Creates the schema (if missing), the table and its index, or brings them up to date.
    ///
    /// Idempotent, and safe to run from several processes at once; see "Migrations" in the
    /// [`PostgresStore`] documentation. Needs a role that may create them; where the serving
    /// role may not, run it once with another role (`idempotency-proxy migrate`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // A one-connection pool of its own rather than the store's pool: sqlx's migrator takes a
        // session-level advisory lock and does not release it when a migration fails. Closing
        // this pool ends the session, which releases the lock in every case, where a pooled
        // connection would keep it and make the next `migrate` anywhere wait forever.
        let options = (*self.inner.pool.connect_options()).clone();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(StoreError::backend)?;
        let migrated = self.run_migrations(&pool).await;
        pool.close().await;
        migrated
    }

    async fn run_migrations(&self, pool: &PgPool) -> Result<(), StoreError> {
        let (schema, table) = (&self.inner.schema, &self.inner.table);
        let mut migrator = migrator(schema, table)?;
        // `CREATE SCHEMA IF NOT EXISTS` checks the CREATE privilege on the database before it
        // checks whether the schema exists, so it is only sent when the schema is missing: a
        // role that may create tables in an existing schema can then migrate.
        let schema_exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(pool)
                .await
                .map_err(StoreError::backend)?;
        if !schema_exists {
            migrator.create_schema(format!("\"{schema}\""));
        }
        migrator.run(pool).await.map_err(StoreError::backend)
    }
}

/// The migrations of `migrations/postgres` with the names filled in, and a migrator whose
/// bookkeeping table sits next to the records table.
fn migrator(schema: &str, table: &str) -> Result<Migrator, StoreError> {
    let templates = sqlx::migrate!("migrations/postgres");
    let migrations = templates
        .iter()
        .map(|template| {
            let sql = substitute(template.sql.as_str(), schema, table).map_err(|placeholder| {
                StoreError::backend(format!(
                    "migration {} uses the unknown placeholder {placeholder}",
                    template.version
                ))
            })?;
            Ok(Migration::new(
                template.version,
                template.description.clone(),
                template.migration_type,
                AssertSqlSafe(sql).into_sql_str(),
                template.no_tx,
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(format!(
        "\"{schema}\".\"{}\"",
        sql::derived_name(table, "_migrations")
    ));
    // A newer release may have applied migrations this one does not know (a rolling deploy, a
    // rollback): they only ever add to the schema, so this release keeps working with it.
    migrator.set_ignore_missing(true);
    Ok(migrator)
}

/// Fills a migration template in; `Err` names a placeholder left over.
fn substitute(template: &str, schema: &str, table: &str) -> Result<String, String> {
    let sql = template
        .replace("{{schema}}", schema)
        .replace("{{table}}", table)
        .replace(
            "{{expires_at_index}}",
            &sql::derived_name(table, "_expires_at_idx"),
        );
    match sql.find("{{") {
        None => Ok(sql),
        Some(at) => Err(sql[at..].chars().take_while(|c| *c != '}').collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_is_fully_substituted() {
        let long_table = "t".repeat(63);
        for (schema, table) in [
            ("public", "idempotency_records"),
            ("s", long_table.as_str()),
        ] {
            let migrator = migrator(schema, table).expect("placeholders are all known");
            assert!(migrator.iter().count() >= 1);
            for migration in migrator.iter() {
                let sql = migration.sql.as_str();
                assert!(!sql.contains("{{"), "{sql}");
                assert!(sql.contains(&format!("\"{schema}\".\"{table}\"")));
            }
        }
    }

    #[test]
    fn unknown_placeholders_are_reported() {
        assert_eq!(
            substitute("CREATE TABLE {{nope}} ()", "s", "t"),
            Err("{{nope".to_owned())
        );
    }
}
