//! `watch(..., sync => true)`: read-your-writes when the inference service has room. A writer's
//! INSERT or UPDATE of a few short rows is embedded inside the writer's own transaction, so its
//! next SELECT, and everyone after its commit, finds the vector; otherwise (and on any error) the
//! change waits for the drain as usual. Its keys are enqueued either way (`_enqueue` first, this
//! after): the drain's later pass finds the row unchanged (its lookup compares content hash and
//! model) and only acks it, so nothing is lost when this step is skipped, fails or rolls back.
//!
//! Who does what: the statement trigger (sql/triggers.sql) runs as the writer and calls
//! `_embed_now` only when `_enqueue` said so (`wanted`), inside a subtransaction of its own
//! (`BEGIN ... EXCEPTION WHEN OTHERS`), so an error here rolls back only this step's writes and
//! never the writer's. `_embed_now` checks that the caller may write the table (as `_enqueue`
//! does: PUBLIC may call it), then does exactly what a drain pass does for these keys with the
//! drain's own code: look the rows up and write the sidecar as the table's owner inside a
//! security-restricted operation (store.rs), decide with `settle::plan`, build the write with
//! `assemble_rows`.
//!
//! No registry row lock (`_lock_source`): taken in the writer's transaction it would serialise every
//! writer of the table for the length of their transactions and stall the drain (which waits 2 s
//! for it, then gives its pass up). The write is safe without it: the upsert (sql/drain.sql) writes
//! a vector only where the content hash it was made from is the row's current one, re-checked
//! under `FOR KEY SHARE` of the source row — and the writer holds that row's lock itself, so
//! nobody else can change the content until it commits. A drain writing the same sidecar row at
//! the same time waits for the writer's row lock (or the writer for the drain's, until it
//! commits); a deadlock between them aborts one side, and if that is this step only its
//! subtransaction goes. The drain's later pass over the key finds it unchanged and acks.
//!
//! Only rows the writer's own transaction wrote (`_written_here`), whatever keys it is handed.
//! Not for chunked embeddings (one row is dozens of passages: the queue only), shadows (set_model
//! builds them in the background), paused embeddings, embeddings whose deferred HNSW index is not
//! built yet (the writer's lock on the sidecar, held to its commit, would keep the build waiting), SERIALIZABLE transactions (the step's
//! reads of the sidecar would add predicate locks, and serialization failures the writer would not
//! otherwise get), security-restricted operations (a table owner's code run by the drain, VACUUM
//! or REFRESH), or sessions that do not embed through the inference service (a writer never
//! loads a model itself).

use std::collections::HashMap;
use std::time::Duration;

use pgrx::prelude::*;

use super::store::{load_source, lookup, write};
use super::{assemble_rows, settle};
use crate::error::SidecarError;
use crate::inference;
use crate::pg::authority::{as_table_owner, current_role, extension_owner, run_as};
use crate::pg::row::required;

/// Most rows one statement may change and still be embedded in the writer's transaction. Measured
/// (scripts/bench/sync_insert.py, 2 shared cores): a single-row INSERT of a 105-byte text takes
/// 36 ms p50 with sync against 4 ms without; the texts of one statement go to the service as one
/// batch, so 16 short rows cost a few times one, not sixteen. A larger statement (a COPY, a bulk
/// UPDATE) is the bulk traffic the queue exists for.
pub const SYNC_MAX_ROWS: usize = 16;

/// Longest text (bytes) embedded in the writer's transaction. The models truncate at their
/// maximum length (256 tokens for all-MiniLM-L6-v2, about 1,000–1,500 bytes of English), so
/// inference itself costs no more past that; what grows is the hashing, tokenizing and copying
/// into the ring. 2,000 bytes covers a title, a comment or a short description in full; longer
/// texts are documents, which wait for the drain. Measured: a 1,914-byte text (at the window)
/// makes a single-row INSERT 168 ms p50, the most a sync row costs on that machine.
pub const SYNC_MAX_BYTES: usize = 2_000;

/// Longest wait for the service's answers before the step gives up (and the queue has the change).
/// Free slots mean a worker takes the texts in its next round; this only bounds a stuck worker.
const SYNC_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// Whether a statement that changed `rows` rows of a sync embedding should be embedded now: few
/// enough rows, the service has a free slot for each right now (no waiting) with a worker alive,
/// and the transaction is one this step may act in (see the module comment).
pub fn wanted(rows: usize) -> bool {
    // SAFETY: read backend-global state
    let (restricted, serializable) =
        unsafe { (pg_sys::InSecurityRestrictedOperation(), pg_sys::XactIsoLevel == pg_sys::XACT_SERIALIZABLE as i32) };
    rows > 0 && rows <= SYNC_MAX_ROWS && !restricted && !serializable && inference::room_now(rows)
}

/// Embed and write the rows of `keys` of source `source_id` now, as the drain would. Returns the
/// sidecar rows written (0: nothing to do here, the queue has it). Errors are the caller's to
/// absorb (the trigger's subtransaction).
pub fn embed_now(source_id: i32, keys: Vec<Option<String>>) -> Result<i64, SidecarError> {
    let keys: Vec<String> = keys.into_iter().flatten().collect();
    // SAFETY: reads backend-global state
    let restricted = unsafe { pg_sys::InSecurityRestrictedOperation() };
    // (a table owner's code run by the drain, VACUUM or REFRESH does not embed: review 5)
    if keys.is_empty() || keys.len() > SYNC_MAX_ROWS || restricted {
        return Ok(0);
    }
    let writer = current_role();
    Spi::connect_mut(|client| {
        let owner = extension_owner(client)?;
        // the registry, as the extension's owner (the writer may not read it)
        let row = run_as(owner, false, || {
            client
                .select(
                    "SELECT source::text, has_any_column_privilege($2, source, 'INSERT, UPDATE'),
                            embed_sidecar._syncs(s), embed_sidecar._written_here_sql(s)
                       FROM embed_sidecar.sources s WHERE id = $1",
                    None,
                    &[source_id.into(), writer.into()],
                )?
                .next()
                .map(|r| -> Result<_, SidecarError> {
                    let what = format!("the registry row of source {source_id}");
                    Ok((
                        required::<String>(&r, 1, &what)?,
                        required::<bool>(&r, 2, &what)?,
                        required::<bool>(&r, 3, &what)?,
                        required::<String>(&r, 4, &what)?,
                    ))
                })
                .transpose()
        })?;
        let Some((table, allowed, sync, written_here_sql)) = row else { return Ok(0) };
        if !allowed {
            return Err(SidecarError::NotAllowed(format!("may not embed changes of table {table}")));
        }
        if !sync {
            return Ok(0);
        }
        let src = run_as(owner, false, || load_source(client, source_id))?;
        // a model whose files changed is the drain's to re-embed (with the new id): a vector made
        // now would carry the old id
        if inference::model_id_of(&src.model)? != src.model_id {
            debug1!("pg_embed_sidecar: sync skipped for {table}: the files of model {} changed", src.model);
            return Ok(0);
        }
        // Only rows this transaction wrote: PUBLIC may call this with keys of its choosing, and
        // what it does (or how long it takes) must not tell a writer about rows it did not write
        // and may not read (review 5: whether a row had a vector, how long its text was).
        let keys: Vec<String> = as_table_owner(src.owner, || {
            let rows = client.select(&written_here_sql, None, &[keys.into()])?;
            rows.into_iter().map(|r| required::<String>(&r, 1, "a key written here")).collect()
        })?;
        if keys.is_empty() {
            return Ok(0);
        }
        // looked up and written as the table's owner, in a security-restricted operation
        let (looked, _) = lookup(client, &src, keys)?;
        let plan = settle::plan(looked);
        let (rows, long): (Vec<_>, Vec<_>) =
            plan.embed.into_iter().partition(|(_, text, _)| text.len() <= SYNC_MAX_BYTES);
        if !long.is_empty() || !plan.failed.is_empty() {
            debug1!(
                "pg_embed_sidecar: sync leaves {} long and {} failed rows of {table} to the queue",
                long.len(),
                plan.failed.len()
            );
        }
        if rows.is_empty() && plan.clear.is_empty() {
            return Ok(0);
        }
        let texts: Vec<&str> = rows.iter().map(|(_, text, _)| text.as_str()).collect();
        #[cfg(feature = "fault_injection")]
        if let Some(marker) = crate::gucs::fail_marker() {
            if texts.iter().any(|t| t.contains(&marker)) {
                return Err(SidecarError::Injected);
            }
        }
        let vectors = if texts.is_empty() {
            Vec::new()
        } else {
            let Some(started) = inference::start_now(&src.model, &texts, SYNC_WAIT_LIMIT)? else {
                debug1!("pg_embed_sidecar: sync skipped for {table}: the inference service has no room now");
                return Ok(0);
            };
            started.wait()?
        };
        let mut failed = HashMap::new();
        let embedded = assemble_rows(src.dims, rows, vectors.into_iter().map(Ok).collect(), &mut failed);
        // (a row that fails or is busy here is the drain's: its message is still queued)
        let written = write(client, &src, embedded, plan.clear, true)?;
        if let Some((key, error)) = written.failed.first() {
            debug1!(
                "pg_embed_sidecar: sync could not write {} rows of {table} (key {key}: {error})",
                written.failed.len()
            );
        }
        Ok(written.rows)
    })
}

#[pg_schema]
pub(crate) mod embed_sidecar {
    use pgrx::prelude::*;

    use crate::error::OrReport;

    /// Embed a writer's changed rows now (see the module comment). PUBLIC may call it; it refuses
    /// callers who may neither insert into nor update the source. Returns the sidecar rows written.
    #[pg_extern(volatile, parallel_unsafe, name = "_embed_now")]
    fn embed_now(source_id: i32, keys: Vec<Option<String>>) -> i64 {
        super::embed_now(source_id, keys).or_report()
    }

    /// Whether a row version (its xmin, as a number) was written by this transaction or one of
    /// its subtransactions: `_embed_now` embeds only those (sql/drain.sql, `_written_here_sql`).
    #[pg_extern(volatile, strict, parallel_restricted, name = "_written_here")]
    fn written_here(xmin: i64) -> bool {
        let Ok(xid) = u32::try_from(xmin) else { return false };
        // SAFETY: reads this backend's transaction state
        unsafe { pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xid)) }
    }
}
