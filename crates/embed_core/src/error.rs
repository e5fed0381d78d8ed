use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model. Each variant carries what the
/// user needs to fix it; the extension maps these to `ereport!` with a hint.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("could not load the ONNX Runtime library \"{path}\": {reason}")]
    Runtime { path: PathBuf, reason: String },
    #[error("model directory \"{0}\" does not exist")]
    ModelDirMissing(PathBuf),
    #[error("no ONNX model file in \"{0}\" (looked for model.onnx, onnx/model.onnx, onnx/model_quantized.onnx)")]
    ModelFileMissing(PathBuf),
    #[error("no tokenizer.json in \"{0}\"")]
    TokenizerMissing(PathBuf),
    #[error("could not read \"{path}\": {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("invalid model manifest \"{path}\": {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("could not load tokenizer \"{path}\": {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("could not load ONNX model \"{path}\": {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("model \"{path}\" has an unsupported shape: {reason}")]
    UnsupportedModel { path: PathBuf, reason: String },
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("inference failed: {0}")]
    Inference(String),
    /// The call was stopped on purpose (`Interrupt::raise`): nothing is wrong with the texts.
    #[error("inference interrupted")]
    Interrupted,
}
