//! `#[pg_test]` tier: SQL functions inside a real backend (each test rolls back). The worker and
//! anything needing a fresh backend is tested by the integration suite in tests/.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: IntoDatum + FromDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql).expect("query runs").expect("value is not NULL")
    }

    /// SQLSTATE, message and hint of the error `sql` raises, or "no error".
    fn error_of(sql: &str) -> String {
        let missing = one::<bool>("SELECT to_regprocedure('pg_temp.error_of(text)') IS NULL");
        if missing {
            create_error_helper();
        }
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()])
            .expect("helper runs")
            .expect("helper returns text")
    }

    fn create_error_helper() {
        Spi::run(
            "CREATE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS $f$
             DECLARE st text; msg text; hint text;
             BEGIN EXECUTE q; RETURN 'no error';
             EXCEPTION WHEN OTHERS THEN
               GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
               RETURN st || ' | ' || msg || ' | ' || hint;
             END $f$",
        )
        .expect("helper created");
    }

    #[pg_test]
    fn embed_text_has_model_dims_and_unit_norm() {
        assert_eq!(one::<i32>("SELECT vector_dims(embed_text('hello world'))"), 384);
        let norm: f64 = one("SELECT vector_norm(embed_text('hello world'))");
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        assert_eq!(one::<i32>("SELECT dims FROM embed_sidecar.model_info()"), 384);
        assert!(one::<String>("SELECT model_id FROM embed_sidecar.model_info()").starts_with("all-MiniLM-L6-v2@"));
    }

    #[pg_test]
    fn null_in_null_out() {
        assert!(one::<bool>("SELECT embed_text(NULL) IS NULL"));
        assert!(one::<bool>("SELECT embed_texts(NULL) IS NULL"));
        assert!(one::<bool>("SELECT (embed_texts(ARRAY['a', NULL, 'b']))[2] IS NULL"));
        assert_eq!(one::<i32>("SELECT cardinality(embed_texts(ARRAY['a', NULL, 'b']))"), 3);
        assert_eq!(one::<i32>("SELECT cardinality(embed_texts('{}'::text[]))"), 0);
    }

    #[pg_test]
    fn batch_equals_single_in_input_order() {
        let min_cos: f64 = one("WITH t AS (SELECT i, 'sentence number ' || i || repeat(' word', i % 37) AS s
                          FROM generate_series(1, 70) i),
                  b AS (SELECT embed_texts(array_agg(s ORDER BY i)) AS vs FROM t)
             SELECT min(1 - (b.vs[t.i] <=> embed_text(t.s))) FROM t, b");
        assert!(min_cos > 0.9999, "min cosine {min_cos}");
    }

    #[pg_test]
    fn similar_sentences_are_closer() {
        let close: f64 =
            one("SELECT 1 - (embed_text('A cat sits on the mat') <=> embed_text('A kitten is sitting on a rug'))");
        let far: f64 =
            one("SELECT 1 - (embed_text('A cat sits on the mat') <=> embed_text('Stock markets fell sharply today'))");
        assert!(close > far + 0.3, "close {close} far {far}");
    }

    #[pg_test]
    fn order_by_embeds_the_query_once() {
        Spi::run(
            "CREATE TEMP TABLE docs AS
               SELECT i, v AS embedding FROM generate_series(1, 300) i,
                      LATERAL (SELECT embed_text('document ' || i) v) x",
        )
        .unwrap();
        let before: i64 = one("SELECT embed_sidecar.texts_embedded()");
        let top: i32 = one("SELECT i FROM docs ORDER BY embedding <=> embed_text('document 42') LIMIT 1");
        let after: i64 = one("SELECT embed_sidecar.texts_embedded()");
        assert_eq!(top, 42);
        assert_eq!(after - before, 1, "query text must be embedded once, not per row");
    }

    #[pg_test]
    fn long_text_is_truncated_not_rejected() {
        let cos: f64 = one(
            "SELECT 1 - (embed_text(repeat('The quick brown fox jumps over the lazy dog. ', 60))
                     <=> embed_text(repeat('The quick brown fox jumps over the lazy dog. ', 60) || repeat('zebra ', 200000)))",
        );
        assert!(cos > 0.9999, "cos {cos}");
    }

    #[pg_test]
    fn missing_model_is_a_clean_error_with_hint() {
        Spi::run("SET LOCAL pg_embed_sidecar.model = 'no-such-model'").unwrap();
        let e = error_of("SELECT embed_text('x')");
        assert!(e.starts_with("58P01 | pg_embed_sidecar: model directory"), "{e}");
        assert!(e.contains("models/install.sh"), "{e}");
    }

    #[pg_test]
    fn model_name_cannot_escape_the_model_path() {
        Spi::run("SET LOCAL pg_embed_sidecar.model = '../../../etc'").unwrap();
        let e = error_of("SELECT embed_text('x')");
        assert!(e.starts_with("22023 | pg_embed_sidecar: invalid model name"), "{e}");
    }

    #[pg_test]
    fn corrupt_model_or_tokenizer_is_a_clean_error() {
        let dir = std::env::temp_dir().join("pg_embed_sidecar_pgtest_models");
        let bad = dir.join("corrupt");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("model.onnx"), b"definitely not onnx").unwrap();
        std::fs::write(bad.join("tokenizer.json"), b"{}").unwrap();
        std::fs::create_dir_all(dir.join("no-tokenizer")).unwrap();
        std::fs::write(dir.join("no-tokenizer").join("model.onnx"), b"x").unwrap();
        Spi::run(&format!("SET LOCAL pg_embed_sidecar.model_path = '{}'", dir.display())).unwrap();

        Spi::run("SET LOCAL pg_embed_sidecar.model = 'corrupt'").unwrap();
        let e = error_of("SELECT embed_text('x')");
        assert!(e.starts_with("F0000 | pg_embed_sidecar: could not load"), "{e}");
        assert!(e.contains("reinstall"), "{e}");

        Spi::run("SET LOCAL pg_embed_sidecar.model = 'no-tokenizer'").unwrap();
        let e = error_of("SELECT embed_text('x')");
        assert!(e.starts_with("58P01 | pg_embed_sidecar: no tokenizer.json"), "{e}");

        // and the session recovers once the setting points at a good model again
        Spi::run("RESET pg_embed_sidecar.model_path").unwrap();
        Spi::run("RESET pg_embed_sidecar.model").unwrap();
        assert_eq!(one::<i32>("SELECT vector_dims(embed_text('back to normal'))"), 384);
    }

    #[pg_test]
    fn settings_are_validated_and_scoped() {
        let e = error_of("SET pg_embed_sidecar.intra_threads = 0");
        assert!(e.starts_with("22023"), "{e}");
        // paths decide what the server dlopens: not for ordinary roles
        Spi::run("CREATE ROLE pes_plain_user").unwrap();
        Spi::run("SET LOCAL ROLE pes_plain_user").unwrap();
        let e = error_of("SET pg_embed_sidecar.onnxruntime_library = '/tmp/evil.so'");
        assert!(e.starts_with("42501"), "{e}");
        // nor threads and batch sizes: CPU and memory levers
        for set in [
            "SET pg_embed_sidecar.intra_threads = 64",
            "SET pg_embed_sidecar.max_batch_tokens = 1048576",
            "SET pg_embed_sidecar.max_batch = 4096",
        ] {
            let e = error_of(set);
            assert!(e.starts_with("42501"), "{set}: {e}");
        }
        // embed_text is executable by default
        assert_eq!(one::<i32>("SELECT vector_dims(embed_text('hello'))"), 384);
    }

    /// A NOT NULL value that is NULL (a registry changed by hand) stops with XX001 and says which,
    /// instead of becoming "" or 0; a present value reads through.
    #[pg_test]
    fn required_columns_refuse_null() {
        use crate::error::SidecarError;
        use crate::pg::row::required;
        Spi::connect(|client| {
            let row = client.select("SELECT 7::oid, NULL::text", None, &[]).unwrap().first();
            assert_eq!(required::<pg_sys::Oid>(&row, 1, "owner").unwrap(), pg_sys::Oid::from(7));
            let e = required::<String>(&row, 2, "column queue_name of source 3").unwrap_err();
            assert!(matches!(e, SidecarError::Corrupt(_)), "{e:?}");
            assert_eq!(e.sqlstate(), PgSqlErrorCode::ERRCODE_DATA_CORRUPTED);
            assert_eq!(e.to_string(), "column queue_name of source 3 is NULL");
        });
    }
}
