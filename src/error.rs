//! Errors of the extension, turned into a Postgres `ERROR` (with SQLSTATE and hint) only at the
//! SQL boundary, so the drain can also log them or store them in the dead-letter table.

use embed_core::EmbedError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("invalid model name \"{0}\"")]
    BadModelName(String),
    /// A failure of the SPI interface itself (a type mismatch reading a row, no tuple table).
    #[error("{0}")]
    Sql(String),
    /// An error PostgreSQL raised inside a transaction of our own (src/pg/xact.rs), with its
    /// SQLSTATE and hint.
    #[error("{message}")]
    Caught { code: PgSqlErrorCode, message: String, hint: Option<String> },
    /// A registry row or queue message that cannot be as it is (a NOT NULL value missing).
    #[error("{0}")]
    Corrupt(String),
    /// The source was unwatched while a pass was on its way.
    #[error("source {0} is no longer watched")]
    Unwatched(i32),
    /// `pg_embed_sidecar.worker_role` names no role.
    #[error("pg_embed_sidecar.worker_role \"{0}\" does not exist; no worker is started")]
    NoWorkerRole(String),
    #[error("permission denied: {0}")]
    NotAllowed(String),
    /// chunk_tokens / chunk_overlap out of range for the model.
    #[error("{0}")]
    Chunking(String),
    /// An error the inference service raised for this request (src/inference/client.rs), carried back
    /// with its SQLSTATE and hint.
    #[error("{message}")]
    Remote { code: i32, message: String, hint: Option<String> },
    /// Input or a context refused before any work, with its own SQLSTATE and hint (a text over
    /// the size limit, a malformed key, a call from inside a security-restricted operation).
    #[error("{message}")]
    Refused { code: PgSqlErrorCode, message: String, hint: &'static str },
    #[cfg(feature = "fault_injection")]
    #[error("injected failure: text contains pg_embed_sidecar.test_fail_marker")]
    Injected,
}

impl From<pgrx::spi::Error> for SidecarError {
    fn from(e: pgrx::spi::Error) -> Self {
        SidecarError::Sql(e.to_string())
    }
}

impl SidecarError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use EmbedError::*;
        match self {
            SidecarError::Embed(ModelDirMissing(_) | ModelFileMissing(_) | TokenizerMissing(_)) => {
                PgSqlErrorCode::ERRCODE_UNDEFINED_FILE
            }
            SidecarError::Embed(Runtime { .. } | Io { .. } | Manifest { .. } | Tokenizer { .. } | Model { .. }) => {
                PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR
            }
            SidecarError::Embed(UnsupportedModel { .. }) => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            SidecarError::BadModelName(_) | SidecarError::Chunking(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            }
            SidecarError::NotAllowed(_) => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            SidecarError::Remote { code, .. } => PgSqlErrorCode::from(*code),
            SidecarError::Refused { code, .. } | SidecarError::Caught { code, .. } => *code,
            SidecarError::Corrupt(_) => PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            SidecarError::Unwatched(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            SidecarError::NoWorkerRole(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            _ => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }

    pub fn hint(&self) -> Option<&str> {
        use EmbedError::*;
        Some(match self {
            SidecarError::Embed(Runtime { .. }) => {
                "Set pg_embed_sidecar.onnxruntime_library to a libonnxruntime.so of version 1.32 or newer \
                 (scripts/setup.sh installs one); the library is loaded once per session."
            }
            SidecarError::Embed(ModelDirMissing(_) | ModelFileMissing(_) | TokenizerMissing(_)) => {
                "Install the model files with models/install.sh, or point pg_embed_sidecar.model and \
                 pg_embed_sidecar.model_path at a directory holding model.onnx (or onnx/model.onnx) and tokenizer.json."
            }
            SidecarError::Embed(Io { .. } | Manifest { .. } | Tokenizer { .. } | Model { .. }) => {
                "The model files are unreadable or corrupt: reinstall them with models/install.sh."
            }
            SidecarError::Embed(UnsupportedModel { .. }) => {
                "Use a BERT-style encoder exported to ONNX with inputs input_ids, attention_mask \
                 (token_type_ids optional) and a last_hidden_state or pooled output."
            }
            SidecarError::BadModelName(_) => {
                "A model name is a directory name under pg_embed_sidecar.model_path, of at most 64 bytes."
            }
            SidecarError::Chunking(_) => {
                "chunk_tokens counts the model's tokens per passage (default and most: its window less the \
                 special tokens); chunk_overlap defaults to an eighth of it. Try embed_sidecar.chunk_text() first."
            }
            SidecarError::NotAllowed(_) => {
                "Only roles that may insert into or update a watched table can put its keys on its queue."
            }
            SidecarError::Remote { hint, .. } | SidecarError::Caught { hint, .. } => return hint.as_deref(),
            SidecarError::Corrupt(_) => {
                "The extension's registry (embed_sidecar.sources) or a queue of it was changed by hand; \
                 unwatch and watch the table again, or reinstall the extension."
            }
            SidecarError::NoWorkerRole(_) => {
                "Create the role, or reset pg_embed_sidecar.worker_role to use the bootstrap superuser."
            }
            SidecarError::Refused { hint, .. } => hint,
            _ => return None,
        })
    }

    /// Raise as a Postgres ERROR. Never returns.
    pub fn report(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), format!("pg_embed_sidecar: {self}"), "pg_embed_sidecar");
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Unwrap a result at the SQL boundary, raising the error as a Postgres ERROR.
pub trait OrReport<T> {
    fn or_report(self) -> T;
}

impl<T> OrReport<T> for Result<T, SidecarError> {
    fn or_report(self) -> T {
        self.unwrap_or_else(|e| e.report())
    }
}
