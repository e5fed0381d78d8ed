//! Tokenise → batch by length → run the ONNX session → pool → normalise.

use std::path::Path;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;

use crate::batching;
use crate::interrupt::Interrupt;
use crate::model_dir::{ModelFiles, Pooling};
use crate::pooling::{l2_normalize, mean_pool};
use crate::runtime::init_runtime;
use crate::window_cut::WindowTokenizer;
use crate::EmbedError;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// ONNX Runtime intra-op threads for this session.
    pub intra_threads: usize,
    /// Most texts in one inference call.
    pub max_batch: usize,
    /// Most tokens (rows × padded length) in one inference call: bounds activation memory.
    pub max_batch_tokens: usize,
    /// ONNX Runtime's CPU arena allocator, and its memory-pattern planning. Measured with
    /// `embed_ceiling --arena/--mem-pattern` (README "Performance"): patterns are planned per input
    /// shape and nearly every batch has a new one, so they mostly add memory at no gain in speed;
    /// without the arena, peak memory and time both rise. Defaults: arena on, patterns off.
    pub cpu_arena: bool,
    pub memory_pattern: bool,
    /// Whether ONNX Runtime's threads spin between the steps of a run instead of sleeping. Spinning
    /// saves a wake-up per step, but a spinning thread holds its core: on a small machine it takes
    /// the CPU the processes that feed the model (the drain worker's SQL, the sessions) need,
    /// and between rounds it burns CPU for nothing (README, "Mixed load"). Default: off.
    pub spinning: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            intra_threads: 1,
            max_batch: 64,
            max_batch_tokens: 2048,
            cpu_arena: true,
            memory_pattern: false,
            spinning: false,
        }
    }
}

/// How the model's output becomes one vector per text.
#[derive(Debug, Clone)]
enum Output {
    /// `[batch, seq, dims]` token states: mean-pool over the attention mask.
    TokenStates(String),
    /// `[batch, dims]`: already pooled by the graph.
    Pooled(String),
}

pub struct Embedder {
    files: ModelFiles,
    tokenizer: WindowTokenizer,
    session: Session,
    has_token_type_ids: bool,
    output: Output,
    dims: usize,
    opts: LoadOptions,
}

impl Embedder {
    /// Load ONNX Runtime from `library` (once per process) and the model in `model_dir`.
    pub fn load(library: &Path, model_dir: &Path, opts: LoadOptions) -> Result<Self, EmbedError> {
        let files = ModelFiles::resolve(model_dir)?;
        let env = init_runtime(library)?;

        let tokenizer = WindowTokenizer::load(&files.tokenizer, files.max_length)
            .map_err(|reason| EmbedError::Tokenizer { path: files.tokenizer.clone(), reason })?;

        let model_err = |e: ort::Error| EmbedError::Model { path: files.onnx.clone(), reason: e.to_string() };
        let session = Session::builder(&env)
            .map_err(model_err)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| model_err(e.into()))?
            .with_intra_threads(opts.intra_threads.max(1))
            .map_err(|e| model_err(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| model_err(e.into()))?
            .with_intra_op_spinning(opts.spinning)
            .map_err(|e| model_err(e.into()))?
            .with_memory_pattern(opts.memory_pattern)
            .map_err(|e| model_err(e.into()))?
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(opts.cpu_arena).build()])
            .map_err(|e| model_err(e.into()))?
            .commit_from_file(&files.onnx)
            .map_err(model_err)?;

        let unsupported = |reason: String| EmbedError::UnsupportedModel { path: files.onnx.clone(), reason };
        let mut has_token_type_ids = false;
        for input in session.inputs() {
            match input.name() {
                "input_ids" | "attention_mask" => {}
                "token_type_ids" => has_token_type_ids = true,
                other => return Err(unsupported(format!("unexpected input \"{other}\""))),
            }
        }
        let rank_and_dims = |o: &ort::value::Outlet| {
            o.dtype().tensor_shape().map(|s| (s.len(), s.last().copied().unwrap_or(-1))).unwrap_or((0, -1))
        };
        let outputs = session.outputs();
        let chosen = match &files.output {
            Some(name) => outputs.iter().find(|o| o.name() == name).ok_or_else(|| {
                unsupported(format!("the manifest names output \"{name}\", which the graph does not have"))
            })?,
            None => outputs
                .iter()
                .find(|o| o.name() == "last_hidden_state")
                .or_else(|| outputs.iter().find(|o| rank_and_dims(o).0 == 3))
                .or_else(|| outputs.iter().find(|o| rank_and_dims(o).0 == 2))
                .ok_or_else(|| unsupported("no output of shape [batch, seq, dims] or [batch, dims]".into()))?,
        };
        let (rank, declared_dims) = rank_and_dims(chosen);
        let pooling = files.pooling.unwrap_or(if rank == 3 { Pooling::Mean } else { Pooling::None });
        let output = match (pooling, rank) {
            (Pooling::Mean, 3) => Output::TokenStates(chosen.name().to_string()),
            (Pooling::None, 2) => Output::Pooled(chosen.name().to_string()),
            _ => {
                return Err(unsupported(format!(
                    "output \"{}\" has rank {rank}: pooling \"mean\" needs [batch, seq, dims], \"none\" needs [batch, dims]",
                    chosen.name()
                )))
            }
        };

        let mut embedder = Self { files, tokenizer, session, has_token_type_ids, output, dims: 0, opts };
        // A dynamic last dimension is learnt from one probe run; the run also warms the session.
        let probe = embedder.embed(&["dimension probe"])?;
        embedder.dims = probe[0].len();
        if declared_dims > 0 && declared_dims as usize != embedder.dims {
            return Err(EmbedError::UnsupportedModel {
                path: embedder.files.onnx.clone(),
                reason: format!("declared {declared_dims} dimensions but produced {}", embedder.dims),
            });
        }
        Ok(embedder)
    }

    pub fn dims(&self) -> usize {
        self.dims
    }
    pub fn files(&self) -> &ModelFiles {
        &self.files
    }
    pub fn model_id(&self) -> &str {
        &self.files.model_id
    }

    /// Token ids of one text, truncated to the model's window.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        Ok(self.tokenizer.encode(text).map_err(EmbedError::Tokenize)?.0)
    }

    /// One unit-length vector per text, in input order. Texts are sorted by token count and cut
    /// into batches (at most `max_batch` texts and `max_batch_tokens` padded tokens) so that
    /// padding, and so wasted compute, stays small.
    pub fn embed<S: AsRef<str>>(&mut self, texts: &[S]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_checked(texts, &mut || {})
    }

    /// Like [`Embedder::embed`], calling `between_batches` before every inference call: the
    /// extension passes Postgres' interrupt check, so a cancel or statement_timeout stops a long
    /// call within one batch.
    pub fn embed_checked<S: AsRef<str>>(
        &mut self,
        texts: &[S],
        between_batches: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_with(texts, between_batches, None)
    }

    /// Like [`Embedder::embed_checked`], and `interrupt` raised from another thread stops the call
    /// within one graph node: [`EmbedError::Interrupted`]. The caller resets it before the call.
    pub fn embed_interruptible<S: AsRef<str>>(
        &mut self,
        texts: &[S],
        between_batches: &mut dyn FnMut(),
        interrupt: &Interrupt,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_with(texts, between_batches, Some(interrupt))
    }

    fn embed_with<S: AsRef<str>>(
        &mut self,
        texts: &[S],
        between_batches: &mut dyn FnMut(),
        interrupt: Option<&Interrupt>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenize(t.as_ref())).collect::<Result<_, _>>()?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());

        let lengths: Vec<usize> = order.iter().map(|&i| ids[i].len()).collect();
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); ids.len()];
        let mut start = 0;
        for end in batching::cut(&lengths, self.opts.max_batch, self.opts.max_batch_tokens) {
            between_batches();
            if interrupt.is_some_and(Interrupt::raised) {
                return Err(EmbedError::Interrupted);
            }
            let batch: Vec<&[u32]> = order[start..end].iter().map(|&i| ids[i].as_slice()).collect();
            let vectors = self.infer(&batch, interrupt).map_err(|e| match interrupt {
                // a run ONNX Runtime ended because we raised the flag, not a broken model
                Some(i) if i.raised() => EmbedError::Interrupted,
                _ => e,
            })?;
            for (&i, v) in order[start..end].iter().zip(vectors) {
                out[i] = v;
            }
            start = end;
        }
        Ok(out)
    }

    /// One session run over token sequences, padded to the longest.
    fn infer(&mut self, batch: &[&[u32]], interrupt: Option<&Interrupt>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let rows = batch.len();
        let seq = batch.iter().map(|b| b.len()).max().unwrap_or(0).max(1);
        let mut input_ids = vec![0i64; rows * seq];
        let mut mask = vec![0i64; rows * seq];
        for (r, tokens) in batch.iter().enumerate() {
            for (c, &t) in tokens.iter().enumerate() {
                input_ids[r * seq + c] = i64::from(t);
                mask[r * seq + c] = 1;
            }
        }
        let err = |e: ort::Error| EmbedError::Inference(e.to_string());
        let shape = [rows, seq];
        let mut inputs = vec![
            ("input_ids", Tensor::from_array((shape, input_ids)).map_err(err)?.into_dyn()),
            ("attention_mask", Tensor::from_array((shape, mask.clone())).map_err(err)?.into_dyn()),
        ];
        if self.has_token_type_ids {
            inputs
                .push(("token_type_ids", Tensor::from_array((shape, vec![0i64; rows * seq])).map_err(err)?.into_dyn()));
        }
        let output = self.output.clone();
        let outputs = match interrupt {
            Some(i) => self.session.run_with_options(inputs, i.run_options()),
            None => self.session.run(inputs),
        }
        .map_err(err)?;
        let (name, pooled) = match &output {
            Output::TokenStates(n) => (n, false),
            Output::Pooled(n) => (n, true),
        };
        let (out_shape, data) = outputs[name.as_str()].try_extract_tensor::<f32>().map_err(err)?;
        let dims = *out_shape.last().unwrap_or(&0) as usize;
        if dims == 0 || data.len() != rows * dims * if pooled { 1 } else { seq } {
            return Err(EmbedError::Inference(format!("unexpected output shape {out_shape}")));
        }
        let vectors = (0..rows)
            .map(|r| {
                let mut v = if pooled {
                    data[r * dims..(r + 1) * dims].to_vec()
                } else {
                    mean_pool(&data[r * seq * dims..(r + 1) * seq * dims], &mask[r * seq..(r + 1) * seq], dims)
                };
                l2_normalize(&mut v);
                v
            })
            .collect();
        Ok(vectors)
    }
}
