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
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgLogLevel;

use crate::pg::authority::{as_table_owner, current_role, extension_owner, run_as, OwnerLocks};
use crate::pg::row::required;
use crate::pg::xact::in_subtransaction;

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
    /// whether a key column's type is defined outside pg_catalog (checking a key may run the
    /// owner's code: a domain's CHECK, an input function)
    owner_code: bool,
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
                        embed_sidecar._keys_check_sql(s, $3), CASE WHEN $5 THEN embed_sidecar._orphans_sql(s) END,
                        EXISTS (SELECT FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                                 WHERE a.attrelid = s.source AND a.attnum = ANY (s.key_attnums)
                                   AND t.typnamespace <> 'pg_catalog'::pg_catalog.regnamespace)
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
                        owner_code: required(&r, 7, &what)?,
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

/// What `enqueue_applied` does with a key it may not queue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BadKeys {
    /// An ERROR, as `_enqueue` gives a writer (a direct call: the caller chose the keys).
    Refuse,
    /// A WARNING and a dead letter, the row left without a vector: the replica row trigger's way.
    /// There the row comes from a publisher, where nothing checks keys as we do (a text key over
    /// `KEY_BYTES`, a value the owner's domain refuses when it runs as the owner), and an ERROR
    /// would abort the apply worker's transaction, which then retries the same change for ever:
    /// every table of the subscription would stop.
    DeadLetter,
}

/// Why the keys are not all keys of the table (None: they are), checked as the table's owner:
/// a domain check or input function of a key type is the owner's code. In a subtransaction of its
/// own: that code may raise what `_invalid_keys`' `WHEN OTHERS` does not catch (an ASSERT, a
/// query_canceled), and that must make the key invalid, not stop the apply worker.
fn invalid_keys(client: &SpiClient<'_>, t: &Target, keys: Vec<Option<String>>) -> Result<Option<String>, SidecarError> {
    let checked = in_subtransaction(|| {
        as_table_owner(t.owner, || {
            Ok(client
                .select(
                    "SELECT embed_sidecar._invalid_keys($1, $2)",
                    None,
                    &[t.check_sql.as_str().into(), keys.into()],
                )?
                .first()
                .get_one::<String>()?)
        })
    });
    checked.or_else(|e| Ok(Some(format!("checking it raised an error: {e}"))))
}

/// Record keys the replica trigger could not queue in the dead-letter table, as the extension's
/// owner, and say so with a WARNING. Each is stored as an object naming it (its first 200
/// characters and the sha256 of all of it), never as the key itself: the key may be too long for
/// the table's index. retry_failed() leaves these where they are (no retry can embed the row);
/// discard_failed() clears them.
fn dead_letter(
    client: &mut SpiClient<'_>,
    owner: pg_sys::Oid,
    source_id: i32,
    table: &str,
    dead: Vec<(Option<String>, String)>,
) -> Result<(), SidecarError> {
    let (keys, errors): (Vec<Option<String>>, Vec<String>) = dead.into_iter().unzip();
    run_as(owner, false, || {
        client.update(
            "INSERT INTO embed_sidecar.failures AS f (source_id, key, error, attempts)
             SELECT DISTINCT ON (1, 2) $1,
                    pg_catalog.jsonb_build_object('unqueued_key', pg_catalog.left(coalesce(u.k, 'null'), 200),
                        'sha256', pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(coalesce(u.k, 'null'), 'UTF8')), 'hex')),
                    'not queued (a row written in replica mode): ' || u.e, 1
               FROM unnest($2::text[], $3::text[]) AS u(k, e)
             ON CONFLICT (source_id, key) DO UPDATE
                SET error = EXCLUDED.error, attempts = f.attempts + 1, last_failed = pg_catalog.now()",
            None,
            &[source_id.into(), keys.clone().into(), errors.clone().into()],
        )?;
        Ok(())
    })?;
    for (key, why) in keys.iter().zip(errors) {
        let shown: String = key.as_deref().unwrap_or("null").chars().take(60).collect();
        ErrorReport::new(
            pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "pg_embed_sidecar: a row of {table} written in replica mode has a key that cannot be queued: {why}"
            ),
            "pg_embed_sidecar",
        )
        .set_detail(format!("The row is applied but gets no vector. Its key begins {shown}"))
        .set_hint(
            "The key is in embed_sidecar.failures (status.failed) as {\"unqueued_key\": ...}. A key must be \
             at most 2,000 bytes as JSON and valid for the key columns' types when checked as the table's owner.",
        )
        .report(PgLogLevel::WARNING);
    }
    Ok(())
}

/// Keys of rows the apply worker (or a replica-mode session) inserted, updated or deleted; keys it
/// may not queue are refused or dead-lettered (`BadKeys`). Returns how many were dead-lettered.
fn enqueue_applied(source_id: i32, keys: Vec<Option<String>>, bad_keys: BadKeys) -> Result<i32, SidecarError> {
    Spi::connect_mut(|client| {
        let ext_owner = extension_owner(client)?;
        let Some(t) = target(client, ext_owner, source_id, "INSERT, UPDATE, DELETE", false)? else { return Ok(0) };
        // The key check runs the owner's code (a domain's CHECK, an input function) in this
        // session, which in the apply worker is a superuser's that lives on: a session-level
        // advisory lock it takes is released after, as after the drain's and process()'s work.
        // Only where a key type is the owner's (pg_catalog's run none of the owner's code): the
        // look at pg_locks costs, and this runs once per replicated row.
        let _release = if t.owner_code { OwnerLocks::release_after(client)? } else { OwnerLocks::keep() };
        let (good, dead) = match invalid_keys(client, &t, keys.clone())? {
            None => (keys, Vec::new()),
            Some(why) if bad_keys == BadKeys::Refuse => {
                return Err(SidecarError::Refused {
                    code: pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    message: format!("invalid key for table {}: {why}", t.table),
                    hint: "A key is the JSON array of a row's primary key values, as the table's own triggers send it.",
                });
            }
            Some(_) => {
                // which ones: each on its own (the row trigger hands over one key, two on a key change)
                let (mut good, mut dead) = (Vec::new(), Vec::new());
                for key in keys {
                    let bytes = key.as_deref().map_or(0, str::len);
                    if bytes > KEY_BYTES as usize {
                        dead.push((
                            key,
                            format!("it is {bytes} bytes as JSON, more than the {KEY_BYTES} a queued key may have"),
                        ));
                        continue;
                    }
                    match invalid_keys(client, &t, vec![key.clone()])? {
                        None => good.push(key),
                        Some(why) => dead.push((key, why)),
                    }
                }
                (good, dead)
            }
        };
        let n = dead.len() as i32;
        if !dead.is_empty() {
            dead_letter(client, ext_owner, source_id, &t.table, dead)?;
        }
        if !good.is_empty() {
            send(client, ext_owner, &t.queue, good)?;
        }
        Ok(n)
    })
}

/// After a TRUNCATE of the source: the keys of its sidecar's rows whose source row is gone go on
/// the live lane, so the drain removes their vectors (a sidecar that follows a subscription has no
/// foreign key, so nothing truncates it with its table). Returns how many.
fn enqueue_orphans(source_id: i32) -> Result<i64, SidecarError> {
    Spi::connect_mut(|client| {
        let ext_owner = extension_owner(client)?;
        let Some(t) = target(client, ext_owner, source_id, "TRUNCATE, DELETE", true)? else { return Ok(0) };
        // the owner's policies run in this session (the apply worker's): see enqueue_applied
        let _release = OwnerLocks::release_after(client)?;
        // read as the table's owner: the sidecar and its policies are the owner's; in a
        // subtransaction, so that whatever they raise (even what WHEN OTHERS lets through) is a
        // WARNING, not the apply worker's error
        let listed = in_subtransaction(|| {
            as_table_owner(t.owner, || {
                let mut keys = Vec::new();
                let sql = t.orphans_sql.as_deref().unwrap_or("SELECT NULL::text WHERE false");
                for r in client.select(sql, None, &[])? {
                    keys.push(r.get::<String>(1)?);
                }
                Ok(keys)
            })
        });
        let keys = match listed {
            Ok(keys) => keys,
            Err(e) => {
                ErrorReport::new(
                    pgrx::PgSqlErrorCode::ERRCODE_WARNING,
                    format!("pg_embed_sidecar: the vectors of {}'s truncated rows were not queued for removal: {e}", t.table),
                    "pg_embed_sidecar",
                )
                .set_hint("embed_sidecar.verify() counts them as orphans; reembed() or unwatch() and watch() again removes them.")
                .report(PgLogLevel::WARNING);
                return Ok(0);
            }
        };
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

    /// Put keys of a table's rows on its live lane, for a caller who may insert into, update or
    /// delete from it (see the module comment); PUBLIC may call it. A key that is not one of the
    /// table's is an ERROR.
    #[pg_extern(volatile, parallel_unsafe, name = "_enqueue_applied")]
    fn enqueue_applied(source_id: i32, keys: Vec<Option<String>>) {
        super::enqueue_applied(source_id, keys, super::BadKeys::Refuse).or_report();
    }

    /// The replica row trigger's way onto the queue: as `_enqueue_applied`, but in replica mode (the
    /// apply worker, or a session a superuser put there) a key that cannot be queued is a WARNING
    /// and a dead letter, never an ERROR (the apply worker would stop on it). Outside replica mode
    /// no trigger of ours calls it, and a bad key is refused as by `_enqueue_applied`: a writer
    /// calling it directly must not fill the owner's dead letters. Returns how many keys were
    /// dead-lettered.
    #[pg_extern(volatile, parallel_unsafe, name = "_enqueue_replicated")]
    fn enqueue_replicated(source_id: i32, keys: Vec<Option<String>>) -> i32 {
        // SAFETY: reads a backend-global setting
        let replica = unsafe { pg_sys::SessionReplicationRole } == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
        let bad_keys = if replica { super::BadKeys::DeadLetter } else { super::BadKeys::Refuse };
        super::enqueue_applied(source_id, keys, bad_keys).or_report()
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
        requires = ["registry", "triggers", enqueue_applied, enqueue_replicated, enqueue_orphans]
    );
}
