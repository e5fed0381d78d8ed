//! SQL functions around the embedder. They return `real[]`; the public `embed_text` /
//! `embed_texts` in sql/api.sql cast to pgvector's `vector`, bound at CREATE EXTENSION time.

use pgrx::prelude::*;

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use crate::error::OrReport;
    use crate::model;

    /// Texts per call into the embedder: bounds the token ids held at once for huge arrays.
    const CHUNK: usize = 1024;

    #[pg_extern(stable, strict, parallel_restricted, name = "_embed")]
    fn embed(content: &str) -> Vec<f32> {
        model::embed_one_with(None, content).or_report()
    }

    /// One text with a named model (search embeds the query with the source's model).
    #[pg_extern(stable, strict, parallel_restricted, name = "_embed_with")]
    fn embed_with(model: &str, content: &str) -> Vec<f32> {
        model::embed_one_with(Some(model), content).or_report()
    }

    #[pg_extern(stable, strict, parallel_restricted, name = "_embed_many")]
    fn embed_many(
        contents: Array<'_, &str>,
    ) -> TableIterator<'static, (name!(ord, i32), name!(embedding, Option<Vec<f32>>))> {
        let texts: Vec<Option<&str>> = contents.iter().collect();
        let present: Vec<&str> = texts.iter().flatten().copied().collect();
        let mut vectors = Vec::with_capacity(present.len());
        for chunk in present.chunks(CHUNK) {
            vectors.extend(model::embed_many(chunk).or_report());
        }
        let mut vectors = vectors.into_iter();
        let rows: Vec<(i32, Option<Vec<f32>>)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (i as i32 + 1, t.and_then(|_| vectors.next())))
            .collect();
        TableIterator::new(rows)
    }

    /// The model this session embeds with.
    #[pg_extern(stable, parallel_restricted)]
    fn model_info() -> TableIterator<
        'static,
        (name!(model, String), name!(model_id, String), name!(dims, i32), name!(max_length, i32), name!(model_dir, String)),
    > {
        let row = model::with_embedder(|e| {
            let f = e.files();
            Ok((f.name.clone(), f.model_id.clone(), e.dims() as i32, f.max_length as i32, f.dir.display().to_string()))
        })
        .or_report();
        TableIterator::once(row)
    }

    /// Texts this backend has run through the model so far.
    #[pg_extern(volatile, parallel_restricted)]
    fn texts_embedded() -> i64 {
        model::texts_embedded()
    }

    extension_sql_file!("../sql/api.sql", name = "api", requires = [embed, embed_many]);
    extension_sql_file!("../sql/search.sql", name = "search", requires = [embed_with, "registry"]);
}
