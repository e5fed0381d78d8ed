//! `watch(..., adopt => column)`: take the vectors a table already holds. A table whose column
//! holds vectors made with the embedding's model need not be embedded again: a sample of its rows
//! is embedded now and compared with what the column holds, and if every one agrees the column's
//! vectors are copied into the sidecar with each row's current content hash and the model's id,
//! so the drain's lookup finds them current and never embeds them. Rows without a vector (or with
//! blank content) are left to the backfill watch() runs after the copy (`only_stale`).
//!
//! The source is read and the sidecar written as the table's owner, in a security-restricted
//! operation (src/pg/authority.rs), as the backfill and the drain do, never as the superuser that
//! runs `_do_watch`. The statements come from sql/watch.sql (`_adopt_sql`), which also checks the
//! column's type and dimensions.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::SidecarError;
use crate::inference;
use crate::pg::authority::as_table_owner;
use crate::pg::row::required;

/// Rows re-embedded to check a column's vectors: enough that another model (or another text
/// template) shows in the lowest cosine, few enough that watch() barely notices (one batch).
const ADOPT_SAMPLE: i64 = 16;

/// Lowest cosine between a sampled row's column vector and the model's vector of its content for
/// the column to be adopted. The same model on the same text agrees to within float rounding
/// (cosine 0.99999+, also between the service and a session), while another model, or the same
/// model over other text (a template, a prefix), falls well below.
const ADOPT_MIN_COSINE: f64 = 0.999;

/// Check and copy the vectors of `column` into the sidecar of source `id`. Returns the rows copied.
pub fn adopt(client: &mut SpiClient<'_>, id: i32, column: &str) -> Result<i64, SidecarError> {
    let row = client
        .select(
            "SELECT s.source::text, s.model, s.model_id, s.fts_config, c.relowner, a.sample_sql, a.copy_sql
               FROM embed_sidecar.sources s JOIN pg_catalog.pg_class c ON c.oid = s.source,
                    LATERAL embed_sidecar._adopt_sql(s, $2) a
              WHERE s.id = $1",
            None,
            &[id.into(), column.into()],
        )?
        .first();
    if row.is_empty() {
        return Err(SidecarError::Unwatched(id));
    }
    let what = format!("the registry row of source {id}");
    let table: String = required(&row, 1, &what)?;
    let model: String = required(&row, 2, &what)?;
    let model_id: String = required(&row, 3, &what)?;
    let fts: Option<String> = row.get(4)?;
    let owner: pg_sys::Oid = required(&row, 5, &what)?;
    let sample_sql: String = required(&row, 6, &what)?;
    let copy_sql: String = required(&row, 7, &what)?;

    let sample = as_table_owner(owner, || {
        let mut out = Vec::new();
        for r in client.select(sample_sql.as_str(), None, &[ADOPT_SAMPLE.into()])? {
            out.push((required::<String>(&r, 1, "a sampled row")?, required::<Vec<f32>>(&r, 2, "a sampled row")?));
        }
        Ok(out)
    })?;
    if !sample.is_empty() {
        let texts: Vec<&str> = sample.iter().map(|(t, _)| t.as_str()).collect();
        let fresh = inference::start_for_drain(&model, &texts).wait()?;
        let lowest =
            sample.iter().zip(&fresh).map(|((_, held), made)| cosine(held, made)).fold(f64::INFINITY, f64::min);
        if lowest < ADOPT_MIN_COSINE {
            return Err(SidecarError::Refused {
                code: pgrx::PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
                message: format!(
                    "the vectors in column \"{column}\" of table {table} were not made by model \"{model}\" from the embedded text: \
                     lowest cosine {lowest:.4} over {} sampled rows (at least {ADOPT_MIN_COSINE} needed)",
                    sample.len()
                ),
                hint: "Were they made by another model (name it with model => '...'), or from another text (a template, a \
                       prefix such as 'passage: ')? Watch without adopt to embed every row instead.",
            });
        }
    }
    let copied = as_table_owner(owner, || {
        Ok(client
            .update(copy_sql.as_str(), None, &[model_id.as_str().into(), fts.as_deref().into()])?
            .first()
            .get_one::<i64>()?
            .unwrap_or(0))
    })?;
    log!("pg_embed_sidecar: adopted {copied} vectors of column \"{column}\" of {table}");
    Ok(copied)
}

/// Cosine of two vectors (0 when either is zero or their lengths differ).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use crate::error::OrReport;

    /// watch(..., adopt => column)'s Rust half (see the module comment): the rows copied.
    #[pg_extern(volatile, parallel_unsafe, name = "_adopt")]
    fn adopt(source_id: i32, column_name: &str) -> i64 {
        Spi::connect_mut(|client| super::adopt(client, source_id, column_name)).or_report()
    }
}

#[cfg(test)]
mod tests {
    use super::cosine;

    #[test]
    fn cosine_of_vectors() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
