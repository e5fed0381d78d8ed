//! Changes our statement triggers never see: those the logical replication apply worker makes (its
//! initial table copy, then every INSERT, UPDATE, DELETE and TRUNCATE it applies), and those of
//! any session running with `session_replication_role = replica`. PostgreSQL fires only row
//! triggers set `ENABLE REPLICA` (or `ALWAYS`) there, so each watched table also has one such row
//! trigger and an `ALWAYS` TRUNCATE trigger (sql/replica.sql); they hand keys to the two functions
//! here, which put them on the live lane exactly as `_enqueue` (src/enqueue.rs) does for the
//! statement triggers. The drain then treats them as it treats any key: a row with new text is
//! embedded, a row that is gone or blank loses its vector.
//!
//! Whose rights: the apply worker runs as the subscription's owner, usually a superuser. The
//! trigger itself builds keys with output functions only (no cast the table's owner could have
//! written); checking the keys against the key columns' types (a domain check, an input function)
//! and listing the sidecar's orphans read the owner's objects, so both run as the table's owner in
//! a security-restricted operation (src/pg/authority.rs), never as the apply worker. The queue is
//! written as the extension's owner, after checking that the writer may change the table.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::SidecarError;
use crate::pg::authority::{as_table_owner, current_role, extension_owner, run_as};
use crate::pg::row::required;

/// Longest key (its JSON text) that may be enqueued (as in src/enqueue.rs: a dead letter's key
/// must fit a btree entry).
const KEY_BYTES: i32 = 2_000;

/// What the registry says about a source, read as the extension's owner.
struct Target {
    queue: String,
    table: String,
    owner: pg_sys::Oid,
    /// `_keys_check_sql` for the source (sql/triggers.sql)
    check_sql: String,
    /// `_orphans_sql` for the source (sql/replica.sql), when asked for
    orphans_sql: Option<String>,
}

/// The source's registry row, if the writer has one of `privileges` on the table (None: unwatched
/// in the meantime, nothing to do); with `orphans`, the statement that lists its orphans too.
fn target(
    client: &SpiClient<'_>,
    owner: pg_sys::Oid,
    source_id: i32,
    privileges: &str,
    orphans: bool,
) -> Result<Option<Target>, SidecarError> {
    let writer = current_role();
    let row = run_as(owner, false, || {
        client
            .select(
                "SELECT s.queue_name, s.source::text, has_table_privilege($2, s.source, $4), c.relowner,
                        embed_sidecar._keys_check_sql(s, $3), CASE WHEN $5 THEN embed_sidecar._orphans_sql(s) END
                   FROM embed_sidecar.sources s JOIN pg_catalog.pg_class c ON c.oid = s.source WHERE s.id = $1",
                None,
                &[source_id.into(), writer.into(), KEY_BYTES.into(), privileges.into(), orphans.into()],
            )?
            .next()
            .map(|r| -> Result<_, SidecarError> {
                let what = format!("the registry row of source {source_id}");
                Ok((
                    Target {
                        queue: required(&r, 1, &what)?,
                        table: required(&r, 2, &what)?,
                        owner: required(&r, 4, &what)?,
                        check_sql: required(&r, 5, &what)?,
                        orphans_sql: r.get(6)?,
                    },
                    required::<bool>(&r, 3, &what)?,
                ))
            })
            .transpose()
    })?;
    let Some((target, allowed)) = row else { return Ok(None) };
    if !allowed {
        return Err(SidecarError::NotAllowed(format!("may not enqueue changes of table {}", target.table)));
    }
    Ok(Some(target))
}

/// Put keys on the source's live lane as the extension's owner, and wake the worker at commit.
fn send(
    client: &mut SpiClient<'_>,
    owner: pg_sys::Oid,
    queue: &str,
    keys: Vec<Option<String>>,
) -> Result<(), SidecarError> {
    run_as(owner, false, || {
        client.update("SELECT pgmq.send_batch($1, $2::text[]::jsonb[])", None, &[queue.into(), keys.into()])?;
        crate::roster::wake::on_commit();
        Ok(())
    })
}

/// Keys of rows the apply worker (or a replica-mode session) inserted, updated or deleted.
fn enqueue_applied(source_id: i32, keys: Vec<Option<String>>) -> Result<(), SidecarError> {
    Spi::connect_mut(|client| {
        let ext_owner = extension_owner(client)?;
        let Some(t) = target(client, ext_owner, source_id, "INSERT, UPDATE, DELETE", false)? else { return Ok(()) };
        // as the table's owner: a domain check or input function of a key type is its code
        let bad = as_table_owner(t.owner, || {
            Ok(client
                .select(
                    "SELECT embed_sidecar._invalid_keys($1, $2)",
                    None,
                    &[t.check_sql.as_str().into(), keys.clone().into()],
                )?
                .first()
                .get_one::<String>()?)
        })?;
        if let Some(why) = bad {
            return Err(SidecarError::Refused {
                code: pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                message: format!("invalid key for table {}: {why}", t.table),
                hint: "A key is the JSON array of a row's primary key values, as the table's own triggers send it.",
            });
        }
        send(client, ext_owner, &t.queue, keys)
    })
}

/// After a TRUNCATE of the source: the keys of its sidecar's rows whose source row is gone go on
/// the live lane, so the drain removes their vectors (a sidecar that follows a subscription has no
/// foreign key, so nothing truncates it with its table). Returns how many.
fn enqueue_orphans(source_id: i32) -> Result<i64, SidecarError> {
    Spi::connect_mut(|client| {
        let ext_owner = extension_owner(client)?;
        let Some(t) = target(client, ext_owner, source_id, "TRUNCATE, DELETE", true)? else { return Ok(0) };
        // read as the table's owner: the sidecar and its policies are the owner's
        let keys = as_table_owner(t.owner, || {
            let mut keys = Vec::new();
            let sql = t.orphans_sql.as_deref().unwrap_or("SELECT NULL::text WHERE false");
            for r in client.select(sql, None, &[])? {
                keys.push(r.get::<String>(1)?);
            }
            Ok(keys)
        })?;
        let n = keys.len() as i64;
        if n > 0 {
            send(client, ext_owner, &t.queue, keys)?;
        }
        Ok(n)
    })
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use crate::error::OrReport;

    /// The replica row trigger's way onto the queue (see the module comment). PUBLIC may call it;
    /// it refuses callers who may not insert into, update or delete from the source.
    #[pg_extern(volatile, parallel_unsafe, name = "_enqueue_applied")]
    fn enqueue_applied(source_id: i32, keys: Vec<Option<String>>) {
        super::enqueue_applied(source_id, keys).or_report()
    }

    /// The TRUNCATE trigger's: enqueue the keys of the sidecar's orphans (see the module comment).
    /// It refuses callers who may neither truncate nor delete from the source.
    #[pg_extern(volatile, parallel_unsafe, name = "_enqueue_orphans")]
    fn enqueue_orphans(source_id: i32) -> i64 {
        super::enqueue_orphans(source_id).or_report()
    }

    extension_sql_file!(
        "../sql/replica.sql",
        name = "replica",
        requires = ["registry", "triggers", enqueue_applied, enqueue_orphans]
    );
}
