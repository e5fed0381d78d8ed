//! SQL functions around the embedder. They return `real[]`; the public `embed_text` /
//! `embed_texts` in sql/api.sql cast to pgvector's `vector`, bound at CREATE EXTENSION time.

use pgrx::prelude::*;

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use crate::error::{OrReport, SidecarError};
    use crate::inference::{self as model, Side};

    /// Texts per call into the embedder: bounds the token ids held at once for huge arrays.
    const CHUNK: usize = 1024;

    /// `embed_text()`: a document, embedded as the drain embeds one (the passage prefix).
    #[pg_extern(stable, strict, parallel_restricted, name = "_embed")]
    fn embed(content: &str) -> Vec<f32> {
        model::embed_one(None, Side::Passage, content).or_report()
    }

    /// `embed_query()`: a search query with the session's model (the query prefix).
    #[pg_extern(stable, strict, parallel_restricted, name = "_embed_as_query")]
    fn embed_as_query(content: &str) -> Vec<f32> {
        model::embed_one(None, Side::Query, content).or_report()
    }

    /// One text with a named model, as a sidecar of that model stores it (the passage prefix):
    /// what a stored vector is compared with (search uses `_embed_query`).
    #[pg_extern(stable, strict, parallel_restricted, name = "_embed_with")]
    fn embed_with(model: &str, content: &str) -> Vec<f32> {
        model::embed_one(Some(model), Side::Passage, content).or_report()
    }

    /// A search's query vector (sql/search.sql): refused when the model's files are no longer those
    /// that made the sidecar's vectors (`model_id`).
    #[pg_extern(stable, strict, parallel_restricted, name = "_embed_query")]
    fn embed_query(model: &str, model_id: &str, content: &str) -> Vec<f32> {
        model::embed_query(model, model_id, content).or_report()
    }

    /// The identity of a model's current files (its files hashed again only when they change):
    /// what search_shards (sql/shards.sql) asks the nodes' rows to carry.
    #[pg_extern(stable, strict, parallel_restricted, name = "_model_id")]
    fn model_id(model: &str) -> String {
        model::model_id_of(model).or_report()
    }

    #[pg_extern(stable, strict, parallel_restricted, name = "_embed_many")]
    fn embed_many(
        contents: Array<'_, &str>,
    ) -> TableIterator<'static, (name!(ord, i32), name!(embedding, Option<Vec<f32>>))> {
        let max = crate::gucs::embed_texts_max();
        if contents.len() > max {
            SidecarError::Refused {
                code: PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                message: format!("embed_texts() takes at most {max} texts, not {}", contents.len()),
                hint: "Call it once per slice of the array, or raise pg_embed_sidecar.embed_texts_max (superuser).",
            }
            .report();
        }
        let texts: Vec<Option<&str>> = contents.iter().collect();
        let present: Vec<&str> = texts.iter().flatten().copied().collect();
        let mut vectors = Vec::with_capacity(present.len());
        for chunk in present.chunks(CHUNK) {
            vectors.extend(model::embed_many(chunk).or_report());
        }
        let mut vectors = vectors.into_iter();
        let rows: Vec<(i32, Option<Vec<f32>>)> =
            texts.iter().enumerate().map(|(i, t)| (i as i32 + 1, t.and_then(|_| vectors.next()))).collect();
        TableIterator::new(rows)
    }

    /// The model this session embeds with.
    #[pg_extern(stable, parallel_restricted)]
    fn model_info() -> TableIterator<
        'static,
        (
            name!(model, String),
            name!(model_id, String),
            name!(dims, i32),
            name!(max_length, i32),
            name!(model_dir, String),
        ),
    > {
        let row = model::with_embedder(|e| {
            let f = e.files();
            Ok((f.name.clone(), f.model_id.clone(), e.dims() as i32, f.max_length as i32, f.dir.display().to_string()))
        })
        .or_report();
        TableIterator::once(row)
    }

    /// Every model directory under `pg_embed_sidecar.model_path` (the `embed_sidecar.models` view).
    /// Dimensions come from loading the model (through the inference service when it runs); a
    /// directory that does not hold a usable model is listed with its error instead.
    // (the row type is spelled out for pgrx, which names the SQL columns from it)
    #[allow(clippy::type_complexity)]
    #[pg_extern(volatile, parallel_restricted, name = "_installed_models")]
    fn installed_models() -> TableIterator<
        'static,
        (
            name!(name, String),
            name!(model_id, Option<String>),
            name!(dims, Option<i32>),
            name!(max_length, Option<i32>),
            name!(size_bytes, Option<i64>),
            name!(error, Option<String>),
        ),
    > {
        let root = crate::gucs::model_root();
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let rows: Vec<_> = names
            .into_iter()
            .map(|name| {
                let described = embed_core::ModelFiles::resolve(&root.join(&name))
                    .map_err(crate::error::SidecarError::from)
                    .and_then(|f| {
                        let size = [&f.onnx, &f.tokenizer]
                            .iter()
                            .filter_map(|p| std::fs::metadata(p).ok())
                            .map(|m| m.len() as i64)
                            .sum();
                        let (id, dims) = model::identity_of(&name)?;
                        Ok((id, dims, f.max_length as i32, size))
                    });
                match described {
                    Ok((id, dims, window, size)) => (name, Some(id), Some(dims), Some(window), Some(size), None),
                    Err(e) => (name, None, None, None, None, Some(e.to_string())),
                }
            })
            .collect();
        TableIterator::new(rows)
    }

    /// Texts this backend has run through the model so far.
    #[pg_extern(volatile, parallel_restricted)]
    fn texts_embedded() -> i64 {
        model::texts_embedded()
    }

    extension_sql_file!(
        "../sql/api.sql",
        name = "api",
        requires = [embed, embed_as_query, embed_many, installed_models]
    );
    extension_sql_file!("../sql/search.sql", name = "search", requires = [embed_with, embed_query, "registry"]);
}
