//! Putting keys on a source's queues: the statement triggers' one privileged step (the live lane),
//! and the backfill (watch, reembed, set_model, a changed model file: the bulk lane, drained only
//! when the live lane has nothing waiting).
//!
//! The triggers run with the writer's rights (sql/triggers.sql) and cannot write pgmq's tables, so
//! they hand their keys to `_enqueue`, which checks that the writer may write the table and only
//! then sends the batch as the extension's owner. The backfill lists keys by reading the source as
//! its owner (src/pg/authority.rs) and sends them the same way, in chunks.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::SidecarError;
use crate::pg::authority::{as_table_owner, current_role, extension_owner, run_as};
use crate::pg::row::required;

/// Keys per `pgmq.send_batch` call in a backfill.
const BACKFILL_CHUNK: i64 = 10_000;

/// Longest key (its JSON text) a writer may enqueue: a dead letter's key must fit a btree entry
/// (2,704 bytes at most).
const KEY_BYTES: i32 = 2_000;

/// Send the keys a writer's statement changed to the source's queue (deleted ones too, beside a
/// sidecar without a foreign key: sql/replica.sql). The keys are checked first,
/// as the writer: each must be the JSON array of one key of the table (right arity, every element
/// castable to its column's type, no NULL, at most `KEY_BYTES`), since `_enqueue` is callable by
/// any writer with keys of their choosing, and a key the drain cannot look up, or too large to
/// store as a dead letter, would otherwise stall the source's queue.
///
/// Returns whether the writer's change may also be embedded now, inside the writer's transaction
/// (`watch(..., sync => true)`, src/drain/sync.rs): the trigger then calls `_embed_now`.
fn enqueue_for_writer(source_id: i32, keys: Vec<Option<String>>) -> Result<bool, SidecarError> {
    let writer = current_role();
    Spi::connect_mut(|client| {
        let owner = extension_owner(client)?;
        let row = run_as(owner, false, || {
            client
                .select(
                    "SELECT queue_name, source::text, has_any_column_privilege($2, source, 'INSERT, UPDATE')
                                OR has_table_privilege($2, source, 'DELETE'),
                            embed_sidecar._keys_check_sql(s, $3), embed_sidecar._syncs(s)
                       FROM embed_sidecar.sources s WHERE id = $1",
                    None,
                    &[source_id.into(), writer.into(), KEY_BYTES.into()],
                )?
                .next()
                .map(|r| -> Result<_, SidecarError> {
                    let what = format!("the registry row of source {source_id}");
                    Ok((
                        required::<String>(&r, 1, &what)?,
                        required::<String>(&r, 2, &what)?,
                        required::<bool>(&r, 3, &what)?,
                        required::<String>(&r, 4, &what)?,
                        required::<bool>(&r, 5, &what)?,
                    ))
                })
                .transpose()
        })?;
        // unwatched in the meantime: nothing to do
        let Some((queue, table, allowed, check_sql, sync)) = row else { return Ok(false) };
        if !allowed {
            return Err(SidecarError::NotAllowed(format!("may not enqueue changes of table {table}")));
        }
        // as the writer: a domain check on a key type is the table owner's code
        let bad = client
            .select(
                "SELECT embed_sidecar._invalid_keys($1, $2)",
                None,
                &[check_sql.as_str().into(), keys.clone().into()],
            )?
            .first()
            .get_one::<String>()?;
        if let Some(why) = bad {
            return Err(SidecarError::Refused {
                code: pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                message: format!("invalid key for table {table}: {why}"),
                hint: "A key is the JSON array of a row's primary key values, as the table's own triggers send it.",
            });
        }
        let rows = keys.len();
        run_as(owner, false, || {
            client.update("SELECT pgmq.send_batch($1, $2::text[]::jsonb[])", None, &[queue.into(), keys.into()])?;
            crate::roster::wake::on_commit();
            Ok(())
        })?;
        Ok(sync && crate::drain::sync::wanted(rows))
    })
}

/// Enqueue every key of source `id` with content (with `only_stale`, only those whose stored hash or
/// model is not current) on its bulk lane. The source is read as its owner; the queue is written as
/// the caller. Returns how many keys were enqueued.
pub fn backfill(client: &mut SpiClient<'_>, id: i32, only_stale: bool) -> Result<i64, SidecarError> {
    let row = client
        .select(
            "SELECT embed_sidecar._bulk_queue(s.queue_name), s.model_id, c.relowner, embed_sidecar._backfill_sql(s)
               FROM embed_sidecar.sources s JOIN pg_catalog.pg_class c ON c.oid = s.source WHERE s.id = $1",
            None,
            &[id.into()],
        )?
        .first();
    if row.is_empty() {
        return Err(SidecarError::Unwatched(id));
    }
    let what = format!("the registry row of source {id}");
    let queue: String = required(&row, 1, &what)?;
    let model_id: String = required(&row, 2, &what)?;
    let owner: pg_sys::Oid = required(&row, 3, &what)?;
    let sql: String = required(&row, 4, &what)?;
    let mut cursor =
        as_table_owner(owner, || Ok(client.try_open_cursor(sql.as_str(), &[only_stale.into(), model_id.into()])?))?;
    let mut total = 0i64;
    loop {
        // fetched as the owner too: the cursor's query runs as whoever fetches
        let keys = as_table_owner(owner, || {
            let mut keys = Vec::new();
            for r in cursor.fetch(BACKFILL_CHUNK)? {
                keys.push(r.get::<String>(1)?);
            }
            Ok(keys)
        })?;
        if keys.is_empty() {
            break;
        }
        total += keys.len() as i64;
        client.update(
            "SELECT pgmq.send_batch($1, $2::text[]::jsonb[])",
            None,
            &[queue.as_str().into(), keys.into()],
        )?;
    }
    if total > 0 {
        // progress and ETA in status count from the moment the bulk lane was last empty
        client.update(
            "UPDATE embed_sidecar.sources s
                SET bulk_total = CASE WHEN m.queue_length = $2 THEN $2 ELSE s.bulk_total + $2 END,
                    bulk_started_at = CASE WHEN m.queue_length = $2 THEN pg_catalog.now() ELSE s.bulk_started_at END
               FROM pgmq.metrics($3) m WHERE s.id = $1",
            None,
            &[id.into(), total.into(), queue.as_str().into()],
        )?;
        crate::roster::wake::on_commit();
    }
    Ok(total)
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use crate::error::OrReport;

    /// The statement triggers' way onto the queue (see the module comment). PUBLIC may call it;
    /// it refuses callers who may neither insert into, update nor delete from the source. True: the change
    /// may also be embedded now (`_embed_now`, src/drain/sync.rs).
    #[pg_extern(volatile, parallel_unsafe, name = "_enqueue")]
    fn enqueue(source_id: i32, keys: Vec<Option<String>>) -> bool {
        super::enqueue_for_writer(source_id, keys).or_report()
    }

    /// Backfill a source (watch, reembed, set_model): returns the number of keys enqueued.
    #[pg_extern(volatile, parallel_unsafe, name = "_backfill")]
    fn backfill(source_id: i32, only_stale: bool) -> i64 {
        Spi::connect_mut(|client| super::backfill(client, source_id, only_stale)).or_report()
    }

    extension_sql_file!("../sql/triggers.sql", name = "triggers", requires = ["registry", enqueue]);
}
