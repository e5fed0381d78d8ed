//! Every `pg_embed_sidecar.*` setting, in one place: private statics, public getters, one `init()`.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use embed_core::LoadOptions;
use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting};

/// Model directory name under `model_path`.
static MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"all-MiniLM-L6-v2"));
/// Directory that holds one sub-directory per model. `$sharedir` expands to the server's share dir.
static MODEL_PATH: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"$sharedir/extension/pg_embed_sidecar/models"));
/// The ONNX Runtime shared library. `$libdir` expands to the server's package library dir.
static ORT_LIBRARY: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"$libdir/pg_embed_sidecar/libonnxruntime.so"));
/// ONNX Runtime threads per backend for one inference call.
static INTRA_THREADS: GucSetting<i32> = GucSetting::<i32>::new(1);
/// Most texts in one inference call.
static MAX_BATCH: GucSetting<i32> = GucSetting::<i32>::new(64);
/// Most padded tokens in one inference call; bounds activation memory. The default is the fastest
/// measured for short and long texts alike (scripts/bench/all.sh; README, Performance).
static MAX_BATCH_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(2048);

/// `shared`: when preloaded, sessions and drains embed through the inference workers
/// (src/inference/); `local`: every process loads and runs the model itself, as in 0.1.
static INFERENCE: GucSetting<Inference> = GucSetting::<Inference>::new(Inference::Shared);

#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Inference {
    #[name = c"shared"]
    Shared,
    #[name = c"local"]
    Local,
}
/// Inference workers (postmaster): each holds one copy of each model in use.
static INFERENCE_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);
/// The most `inference_workers` the ring has places for (src/inference/ring.rs).
pub const INFERENCE_WORKERS_MAX: usize = 16;
/// ONNX Runtime threads of each inference worker (postmaster); 0: one per CPU.
static INFERENCE_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Whether a search that arrives while the inference service runs a drain round stops that round
/// (it is embedded again after the search): off, the search waits for the round to end. Off only
/// to compare (scripts/bench/mixed_load.py) or should ONNX Runtime misbehave on a stopped run.
static SEARCHES_FIRST: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Texts in flight at once through the service (postmaster; sizes shared memory, 74 KiB each).
/// One call uses at most half of them per round trip, so two sessions always make progress.
/// A full ring makes clients wait: back-pressure instead of unbounded memory.
static INFERENCE_SLOTS: GucSetting<i32> = GucSetting::<i32>::new(128);
/// Optional allow-list of databases that get a drain worker (comma-separated); empty: every
/// database that has the extension (the launcher finds them).
static WORKER_DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Role the worker connects as; empty means the bootstrap superuser.
static WORKER_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Whether a database gets a drain worker; set per database (`ALTER DATABASE d SET ...`) to keep
/// one out, e.g. where only `process()` should drain. Read by the worker when it connects.
static DRAIN_WORKER: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Queue messages read per drain pass.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(256);
/// Most bulk-lane (backfill) messages in one drain pass: bounds how long a writer's change can wait
/// behind a backfill (one such pass).
static BULK_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(64);
/// Inference time one drain pass may spend on bulk-lane rows, in milliseconds: the worker sizes
/// each source's bulk window by what its recent rows took, so a writer's change waits about this
/// long behind a backfill of long documents, not 64 of them (README, "Mixed load"). 0: windows of
/// `bulk_batch_size`.
static BULK_PASS_MS: GucSetting<i32> = GucSetting::<i32>::new(250);
/// A new sidecar whose backfill enqueues at least this many rows gets its HNSW index once, after
/// the backfill (read by watch() and set_model() in SQL, so no accessor here): one build costs far
/// less than inserting row by row into the graph (README, "Drain throughput and scale").
static BULK_INDEX_ROWS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Worker heartbeat when queues are empty, in milliseconds. A commit that enqueues wakes the
/// worker at once (src/roster/wake.rs), so this only bounds how late other work is noticed (a retry's
/// back-off running out, a resumed source, a replaced model file).
static IDLE_NAPTIME_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Attempts before a message moves to the dead-letter table.
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(3);
/// Largest text, in kB, cut into passages (chunk_text, a chunked source's drain, verify): the
/// tokenizer holds ~170 bytes per byte of input while it works, so an unbounded text is an
/// unbounded allocation (60 MB took a backend to 10 GB).
static CHUNK_TEXT_MAX_KB: GucSetting<i32> = GucSetting::<i32>::new(1024);
/// Most texts one `embed_texts()` call takes: its vectors are all held until it returns (1.5 KiB
/// each at 384 dimensions), and any role may call it.
static EMBED_TEXTS_MAX: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// A filtered search ranks every matching row exactly, without the HNSW index, when the planner
/// expects at most this many to match (sql/search.sql); above it, it walks the index iteratively.
/// Exact costs about the same per matching row whatever the table's size, the walk about the same
/// per share of rows let through: on 64k packages they cost the same near 1,000 rows (README
/// "Filtered search", scripts/bench/filtered.py).
static EXACT_SEARCH_ROWS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
/// Who called the management or search function running now (src/pg/authority.rs): set by
/// `embed_sidecar._enter()` in each public function, scoped to it by the function's own SET clause.
/// Anyone may set it, but only `_enter()` can give it a value `_calling_role()` accepts.
static CALLER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Seconds a read message stays invisible to other readers (crash recovery: it reappears after).
static VISIBILITY_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Test hook: texts containing this marker fail inference in the drain. Superuser only; only in
/// builds with the `fault_injection` feature (scripts/test.sh), never in a release install.
#[cfg(feature = "fault_injection")]
static FAIL_MARKER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Test hook: milliseconds an index builder waits before it builds, so a test can watch the drain
/// go on meanwhile. Superuser only; `fault_injection` builds only.
#[cfg(feature = "fault_injection")]
static INDEX_BUILD_DELAY_MS: GucSetting<i32> = GucSetting::<i32>::new(0);

pub fn init() {
    // Threads and batch sizes decide how much CPU and memory one backend's inference takes: a lever
    // for the administrator (per role or database with ALTER ROLE/DATABASE ... SET), not for any
    // role that can call embed_text(): superuser only.
    // Paths decide which files the server process opens and which library it dlopens: superuser only.
    GucRegistry::define_string_guc(
        c"pg_embed_sidecar.model",
        c"Name of the embedding model (a directory under pg_embed_sidecar.model_path).",
        c"",
        &MODEL,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_embed_sidecar.model_path",
        c"Directory holding one sub-directory per model; $sharedir expands to the server's share directory.",
        c"",
        &MODEL_PATH,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_embed_sidecar.onnxruntime_library",
        c"Path of libonnxruntime.so (1.32 or newer); $libdir expands to the server's library directory.",
        c"Loaded once per process: a change takes effect in new sessions.",
        &ORT_LIBRARY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.intra_threads",
        c"ONNX Runtime threads one backend uses for an inference call.",
        c"",
        &INTRA_THREADS,
        1,
        64,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.max_batch",
        c"Most texts in one inference call.",
        c"",
        &MAX_BATCH,
        1,
        4096,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.max_batch_tokens",
        c"Most padded tokens in one inference call; bounds the memory of one call.",
        c"",
        &MAX_BATCH_TOKENS,
        64,
        1 << 20,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.batch_size",
        c"Queue messages read per drain pass.",
        c"",
        &BATCH_SIZE,
        1,
        10_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.bulk_batch_size",
        c"Most backfill (bulk lane) messages in one drain pass; writers' changes always go first.",
        c"",
        &BULK_BATCH_SIZE,
        1,
        10_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.bulk_pass_time",
        c"Inference time one drain pass may spend on backfill (bulk lane) rows; 0 takes bulk_batch_size rows every pass.",
        c"A writer's change waits for about one such pass while a backfill runs.",
        &BULK_PASS_MS,
        0,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.bulk_index_rows",
        c"A new sidecar with at least this many rows to backfill gets its HNSW index built once, after the backfill (0: always up front).",
        c"",
        &BULK_INDEX_ROWS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_embed_sidecar.inference",
        c"Where embeddings are computed: shared (the instance's inference workers, when preloaded) or local (this process).",
        c"",
        &INFERENCE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_embed_sidecar.searches_first",
        c"Whether a search arriving during a drain round of the inference service stops that round (embedded again after the search).",
        c"",
        &SEARCHES_FIRST,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_embed_sidecar.drain_worker",
        c"Whether this database gets a drain worker (set it per database with ALTER DATABASE).",
        c"Off: queued changes wait for embed_sidecar.process(). Takes effect when the worker (re)starts.",
        &DRAIN_WORKER,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.idle_naptime",
        c"How long the worker sleeps when every queue is empty (a commit that enqueues wakes it at once).",
        c"",
        &IDLE_NAPTIME_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.max_attempts",
        c"Failed attempts after which a row moves to embed_sidecar.failures.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.chunk_text_max",
        c"Largest text cut into passages; a chunked row over it is dead-lettered, chunk_text() refuses it.",
        c"",
        &CHUNK_TEXT_MAX_KB,
        1,
        1024 * 1024,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.embed_texts_max",
        c"Most texts one embed_texts() call takes.",
        c"",
        &EMBED_TEXTS_MAX,
        1,
        10_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.exact_search_rows",
        c"A filtered search expected to match at most this many rows ranks them exactly instead of walking the index.",
        c"",
        &EXACT_SEARCH_ROWS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_embed_sidecar.caller",
        c"Internal: the role that called the pg_embed_sidecar function running now.",
        c"",
        &CALLER,
        GucContext::Userset,
        GucFlags::NO_SHOW_ALL | GucFlags::NO_RESET_ALL | GucFlags::SUPERUSER_ONLY | GucFlags::DISALLOW_IN_FILE,
    );
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.visibility_timeout",
        c"Seconds a message being processed stays invisible; after a crash it reappears then.",
        c"",
        &VISIBILITY_TIMEOUT_S,
        1,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    // Postmaster-context settings can only be defined while the library is preloaded; without
    // preloading there is no worker and their defaults are never read.
    // SAFETY: reading a flag the postmaster sets while loading shared_preload_libraries
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"pg_embed_sidecar.databases",
            c"If set, only these databases (comma-separated) get a drain worker.",
            c"Empty (the default): every database where the extension is installed.",
            &WORKER_DATABASES,
            GucContext::Sighup,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"pg_embed_sidecar.inference_workers",
            c"Inference workers of the instance (each holds one copy of each model in use).",
            c"",
            &INFERENCE_WORKERS,
            0,
            INFERENCE_WORKERS_MAX as i32,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"pg_embed_sidecar.inference_threads",
            c"ONNX Runtime threads of each inference worker; 0 means one per CPU.",
            c"",
            &INFERENCE_THREADS,
            0,
            256,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"pg_embed_sidecar.inference_slots",
            c"Texts in flight at once through the inference workers (sizes shared memory).",
            c"",
            &INFERENCE_SLOTS,
            8,
            4096,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc(
            c"pg_embed_sidecar.worker_role",
            c"Role the background worker connects as (default: the bootstrap superuser).",
            c"",
            &WORKER_ROLE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    #[cfg(feature = "fault_injection")]
    GucRegistry::define_string_guc(
        c"pg_embed_sidecar.test_fail_marker",
        c"Testing only: texts containing this string fail inference in the drain.",
        c"",
        &FAIL_MARKER,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    #[cfg(feature = "fault_injection")]
    GucRegistry::define_int_guc(
        c"pg_embed_sidecar.test_index_build_delay_ms",
        c"Testing only: milliseconds an index builder waits before it builds.",
        c"",
        &INDEX_BUILD_DELAY_MS,
        0,
        600_000,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Expand a leading `$libdir` / `$sharedir` like the server does for `dynamic_library_path`.
fn expand(path: &str) -> PathBuf {
    let dir = |which: &str| -> String {
        let mut buf = [0 as std::ffi::c_char; pg_sys::MAXPGPATH as usize];
        // SAFETY: both functions write a NUL-terminated path of at most MAXPGPATH bytes into buf.
        unsafe {
            if which == "lib" {
                pg_sys::get_pkglib_path(std::ptr::addr_of!(pg_sys::my_exec_path).cast(), buf.as_mut_ptr());
            } else {
                pg_sys::get_share_path(std::ptr::addr_of!(pg_sys::my_exec_path).cast(), buf.as_mut_ptr());
            }
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        }
    };
    if let Some(rest) = path.strip_prefix("$libdir") {
        PathBuf::from(dir("lib") + rest)
    } else if let Some(rest) = path.strip_prefix("$sharedir") {
        PathBuf::from(dir("share") + rest)
    } else {
        PathBuf::from(path)
    }
}

/// Everything that decides which embedder a backend holds; a change means a reload.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedSettings {
    pub library: PathBuf,
    pub model: String,
    pub model_dir: PathBuf,
    pub intra_threads: usize,
    pub max_batch: usize,
    pub max_batch_tokens: usize,
}

impl EmbedSettings {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            intra_threads: self.intra_threads,
            max_batch: self.max_batch,
            max_batch_tokens: self.max_batch_tokens,
            ..LoadOptions::default()
        }
    }
}

/// Current settings, for `model` if given, else for `pg_embed_sidecar.model`.
pub fn embed_settings(model: Option<&str>) -> EmbedSettings {
    let model = model.map(str::to_string).unwrap_or_else(|| string(&MODEL));
    EmbedSettings {
        library: expand(&string(&ORT_LIBRARY)),
        model_dir: model_root().join(&model),
        model,
        intra_threads: INTRA_THREADS.get() as usize,
        max_batch: MAX_BATCH.get() as usize,
        max_batch_tokens: MAX_BATCH_TOKENS.get() as usize,
    }
}

/// The directory holding one subdirectory per installed model (`pg_embed_sidecar.model_path`).
pub fn model_root() -> PathBuf {
    expand(&string(&MODEL_PATH))
}

pub fn worker_databases() -> Vec<String> {
    string(&WORKER_DATABASES).split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}
pub fn worker_role() -> Option<String> {
    Some(string(&WORKER_ROLE)).filter(|s| !s.is_empty())
}
pub fn inference_shared() -> bool {
    INFERENCE.get() == Inference::Shared
}
pub fn inference_workers() -> usize {
    INFERENCE_WORKERS.get() as usize
}
pub fn inference_slots() -> usize {
    INFERENCE_SLOTS.get() as usize
}
pub fn searches_first() -> bool {
    SEARCHES_FIRST.get()
}
pub fn inference_threads() -> usize {
    match INFERENCE_THREADS.get() {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n as usize,
    }
}
/// The session embeds from the files the inference workers load: a superuser who pointed this
/// session elsewhere (SET model_path / onnxruntime_library) is served locally instead.
pub fn paths_as_configured() -> bool {
    [c"pg_embed_sidecar.model_path", c"pg_embed_sidecar.onnxruntime_library"].iter().all(|name| {
        // SAFETY: read-only lookups of a defined setting's current and reset values
        unsafe {
            let now = pg_sys::GetConfigOption(name.as_ptr(), true, false);
            let reset = pg_sys::GetConfigOptionResetString(name.as_ptr());
            !now.is_null() && !reset.is_null() && CStr::from_ptr(now) == CStr::from_ptr(reset)
        }
    })
}
pub fn drain_worker() -> bool {
    DRAIN_WORKER.get()
}
pub fn batch_size() -> i32 {
    BATCH_SIZE.get()
}
pub fn bulk_batch_size() -> i32 {
    BULK_BATCH_SIZE.get()
}
pub fn bulk_pass_time() -> std::time::Duration {
    std::time::Duration::from_millis(BULK_PASS_MS.get() as u64)
}
pub fn idle_naptime_ms() -> u64 {
    IDLE_NAPTIME_MS.get() as u64
}
pub fn max_attempts() -> i32 {
    MAX_ATTEMPTS.get()
}
pub fn chunk_text_max_bytes() -> usize {
    CHUNK_TEXT_MAX_KB.get() as usize * 1024
}
pub fn embed_texts_max() -> usize {
    EMBED_TEXTS_MAX.get() as usize
}
pub fn caller() -> String {
    string(&CALLER)
}
pub fn visibility_timeout_s() -> i32 {
    VISIBILITY_TIMEOUT_S.get()
}
#[cfg(feature = "fault_injection")]
pub fn index_build_delay_ms() -> u64 {
    INDEX_BUILD_DELAY_MS.get() as u64
}
#[cfg(feature = "fault_injection")]
pub fn fail_marker() -> Option<String> {
    Some(string(&FAIL_MARKER)).filter(|s| !s.is_empty())
}
