//! The instance's inference service, client side and shared memory (issue 9). When the library is
//! preloaded, sessions and drains do not load a model: they put their texts into slots of a ring
//! in shared memory, set the inference workers' latches (src/service_worker.rs), and wait on their
//! own latch for the vectors. One copy of each model per instance, one thread pool, and texts from
//! many sessions embedded in one batched call.
//!
//! A slot moves FREE → FILLING (a client owns it) → SUBMITTED → TAKEN by worker i (the worker
//! owns it) → DONE / FAILED → FREE (the client read it). Every transition is a compare-and-swap on
//! the slot's state word, which also names the worker that took it, and the payload is written
//! before, and read after, the state change that hands the slot over (release/acquire), so no lock
//! is needed. A client that gives up (cancel, timeout) takes back a SUBMITTED slot, or marks a
//! taken one abandoned for its worker to free. A worker that dies leaves taken slots behind: their
//! clients see its pid gone and resubmit them, and its successor resubmits them when it starts.

use std::mem::size_of;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::PgSqlErrorCode;

use crate::error::SidecarError;
use crate::gucs;

pub const FREE: u32 = 0;
pub const FILLING: u32 = 1;
pub const SUBMITTED: u32 = 2;
pub const DONE: u32 = 4;
pub const FAILED: u32 = 5;
/// Taken by worker `i`: `TAKEN + i`; abandoned by its client while worker `i` had it: `ABANDONED + i`.
const TAKEN: u32 = 16;
const ABANDONED: u32 = TAKEN + WORKERS_MAX as u32;

pub fn taken_by(worker: usize) -> u32 {
    TAKEN + worker as u32
}
pub fn abandoned_by(worker: usize) -> u32 {
    ABANDONED + worker as u32
}
/// The worker a taken slot belongs to.
pub fn taker(state: u32) -> Option<usize> {
    (TAKEN..ABANDONED).contains(&state).then(|| (state - TAKEN) as usize)
}
/// The worker an abandoned slot belongs to.
pub fn abandoner(state: u32) -> Option<usize> {
    (ABANDONED..ABANDONED + WORKERS_MAX as u32).contains(&state).then(|| (state - ABANDONED) as usize)
}

/// Bytes of text a slot carries. The embedder cuts every input at 64 bytes per window token
/// before tokenising, so this covers windows up to 1,024 tokens; longer inputs are cut here at a
/// character boundary, which gives the same vector.
pub const TEXT_MAX: usize = 64 * 1024;
/// Most dimensions of a vector a slot carries back.
pub const DIMS_MAX: usize = 2048;
pub const MODEL_MAX: usize = 64;
pub const MESSAGE_MAX: usize = 512;
/// Most inference workers (`pg_embed_sidecar.inference_workers`).
pub const WORKERS_MAX: usize = 16;

/// Interactive requests (a session waiting for a query vector) go before drain batches.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Priority {
    Interactive = 0,
    Drain = 1,
}

#[repr(C)]
pub struct Header {
    pub worker_pid: [AtomicI32; WORKERS_MAX],
    pub worker_procno: [AtomicI32; WORKERS_MAX],
    next_seq: AtomicU64,
    /// Texts embedded and microseconds spent embedding them, all workers together, since start:
    /// `inference_service()` shows how busy the service is (a drain at its ceiling keeps it busy).
    pub texts_served: AtomicU64,
    pub busy_us: AtomicU64,
    pub slots: u32,
}

#[repr(C)]
pub struct Slot {
    pub state: AtomicU32,
    owner_pid: AtomicI32,
    owner_procno: AtomicI32,
    pub priority: u32,
    pub seq: u64,
    pub model_len: u32,
    pub model: [u8; MODEL_MAX],
    pub text_len: u32,
    pub dims: u32,
    /// FAILED: the error's SQLSTATE (as pgrx numbers it), message and hint
    pub error_code: i32,
    pub message_len: u32,
    pub message: [u8; MESSAGE_MAX],
    pub hint_len: u32,
    pub hint: [u8; MESSAGE_MAX],
    pub vector: [f32; DIMS_MAX],
    pub text: [u8; TEXT_MAX],
}

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;
/// The ring in this process's address space (set by the startup hook; inherited by every child).
static mut BASE: *mut Header = null_mut();

fn ring_size(slots: usize) -> usize {
    size_of::<Header>().next_multiple_of(64) + slots * size_of::<Slot>()
}

/// Ask for the ring; only while preloading (from `_PG_init`).
pub fn init() {
    // SAFETY: hooks are chained from _PG_init while preloading, before any backend exists
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_ring);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(create_ring);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request_ring() {
    if let Some(prev) = PREV_REQUEST {
        prev();
    }
    pg_sys::RequestAddinShmemSpace(ring_size(gucs::inference_slots()));
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn create_ring() {
    if let Some(prev) = PREV_STARTUP {
        prev();
    }
    let slots = gucs::inference_slots();
    let size = ring_size(slots);
    // AddinShmemInitLock is a macro in C: the 22nd of the main LWLocks (lwlocknames.txt)
    let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut found = false;
    let base = pg_sys::ShmemInitStruct(c"pg_embed_sidecar inference ring".as_ptr(), size, &mut found);
    if !found {
        // all zeroes: every slot FREE, no worker
        std::ptr::write_bytes(base.cast::<u8>(), 0, size);
        (*base.cast::<Header>()).slots = slots as u32;
    }
    BASE = base.cast();
    pg_sys::LWLockRelease(init_lock);
}

/// Set in an inference worker: it embeds locally, never through the ring.
static IN_WORKER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn become_worker() {
    IN_WORKER.store(true, Ordering::Relaxed);
}

pub fn in_worker() -> bool {
    IN_WORKER.load(Ordering::Relaxed)
}

pub fn header() -> Option<&'static Header> {
    // SAFETY: set once by the startup hook before any backend runs; never moved or freed
    unsafe { BASE.as_ref() }
}

pub fn slot(header: &'static Header, i: usize) -> &'static mut Slot {
    // SAFETY: i < header.slots; the slot is only written by whoever owns its current state
    unsafe {
        let first = (header as *const Header as *mut u8).add(size_of::<Header>().next_multiple_of(64));
        &mut *first.cast::<Slot>().add(i)
    }
}

pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists
    pid != 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn my_ids() -> (i32, i32) {
    // SAFETY: this backend's own pid and PGPROC number
    unsafe { (pg_sys::MyProcPid, (*pg_sys::MyProc).pgprocno) }
}

/// Whether this process should embed through the service: preloaded, the service chosen, and
/// the files the worker loads from are the configured ones (a superuser who points this session
/// at other files gets them loaded locally, as without preloading).
pub fn usable() -> bool {
    header().is_some() && !in_worker() && gucs::inference_shared() && gucs::paths_as_configured()
}

fn wake_workers(header: &Header) {
    for i in 0..WORKERS_MAX {
        if alive(header.worker_pid[i].load(Ordering::Acquire)) {
            // SAFETY: sets that PGPROC's latch
            unsafe { pg_sys::ProcSendSignal(header.worker_procno[i].load(Ordering::Acquire)) };
        }
    }
}

fn any_worker_alive(header: &Header) -> bool {
    (0..WORKERS_MAX).any(|i| alive(header.worker_pid[i].load(Ordering::Acquire)))
}

/// How long a request may wait with no inference worker running before it fails.
const NO_WORKER_GRACE: Duration = Duration::from_secs(15);
/// How long a drain waits for one slots' worth of its texts before it gives the pass up. A session
/// has its statement_timeout; the drain worker has none, and an inference worker that is alive but
/// stuck would otherwise hold every drain of the instance. A drain's slots take seconds at most,
/// even behind sessions (they get one round in four).
const DRAIN_WAIT_LIMIT: Duration = Duration::from_secs(300);

/// The slots this call holds, given back on every way out (a cancel unwinds through here).
struct Held {
    header: &'static Header,
    slots: Vec<usize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        for &i in &self.slots {
            let s = slot(self.header, i);
            // taken → abandoned (its worker frees it); anything else of ours → FREE
            loop {
                let state = s.state.load(Ordering::Acquire);
                let next = taker(state).map_or(FREE, abandoned_by);
                if s.state.compare_exchange(state, next, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    break;
                }
            }
        }
    }
}

/// Embed `texts` with `model` through the service, in input order.
pub fn embed(model: &str, texts: &[&str], priority: Priority) -> Result<Vec<Vec<f32>>, SidecarError> {
    submit(model, texts, priority)?.collect()
}

/// Texts handed to the service whose vectors are not collected yet: the caller does other work
/// (a drain writes its previous pass) while a worker embeds them.
pub struct Pending {
    header: &'static Header,
    model: String,
    priority: Priority,
    /// Shortest first (see `submit`); `order[i]` is the input position of `texts[i]`.
    texts: Vec<String>,
    order: Vec<usize>,
    /// The first slots' worth, submitted by `submit`; the rest go as slots come back.
    first: Option<Held>,
}

/// Submit the first slots' worth of `texts` (at most half the ring) and return without waiting.
pub fn submit(model: &str, texts: &[&str], priority: Priority) -> Result<Pending, SidecarError> {
    let header = header().ok_or_else(|| SidecarError::Sql("the inference service is not running".into()))?;
    if model.len() > MODEL_MAX {
        return Err(SidecarError::BadModelName(model.to_string()));
    }
    // Submitted shortest first: a worker's round takes consecutive requests and pads each batch to
    // its longest text, so neighbours of similar length waste the least compute (byte length
    // stands in for token count, which only the worker can know). Results go back to input order.
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let texts = order.iter().map(|&i| texts[i].to_string()).collect();
    let mut pending = Pending { header, model: model.to_string(), priority, texts, order, first: None };
    if !pending.texts.is_empty() {
        pending.first = Some(pending.send(0)?);
    }
    Ok(pending)
}

impl Pending {
    /// Claim as many slots as are free (at least one) for the texts from `next` on, fill them and
    /// wake the workers.
    fn send(&self, next: usize) -> Result<Held, SidecarError> {
        let header = self.header;
        let mut held = Held { header, slots: Vec::new() };
        let started = Instant::now();
        while held.slots.is_empty() {
            held.slots = claim(header, (self.texts.len() - next).min(header.slots as usize / 2).max(1), self.priority);
            if held.slots.is_empty() {
                // the ring is full: back-pressure, not unbounded memory
                wait(Duration::from_millis(10));
                pgrx::check_for_interrupts!();
                if !any_worker_alive(header) && started.elapsed() > NO_WORKER_GRACE {
                    return Err(no_worker());
                }
            }
        }
        let (pid, procno) = my_ids();
        for (&i, text) in held.slots.iter().zip(&self.texts[next..]) {
            let s = slot(header, i);
            fill(s, &self.model, text, self.priority, pid, procno, header.next_seq.fetch_add(1, Ordering::Relaxed));
            // only this client moves a FILLING slot (tidy() leaves FILLING alone), so this holds
            let _ = s.state.compare_exchange(FILLING, SUBMITTED, Ordering::AcqRel, Ordering::Relaxed);
        }
        wake_workers(header);
        Ok(held)
    }

    /// Wait for every vector, submitting the rest of the texts as slots come back.
    pub fn collect(mut self) -> Result<Vec<Vec<f32>>, SidecarError> {
        let mut out = Vec::with_capacity(self.texts.len());
        let mut held = self.first.take();
        while let Some(h) = held {
            let limit = (self.priority == Priority::Drain).then_some(DRAIN_WAIT_LIMIT);
            out.extend(collect(self.header, &h.slots, limit)?);
            // the slots go back before the next ones are claimed
            drop(h);
            held = if out.len() < self.texts.len() { Some(self.send(out.len())?) } else { None };
        }
        let mut in_order = vec![Vec::new(); out.len()];
        for (&i, v) in self.order.iter().zip(out) {
            in_order[i] = v;
        }
        Ok(in_order)
    }
}

fn no_worker() -> SidecarError {
    SidecarError::Remote {
        code: PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE as i32,
        message: "no inference worker is running".into(),
        hint: Some(
            "Look for pg_embed_sidecar lines in the server log, or set pg_embed_sidecar.inference = 'local' to embed in this session."
                .into(),
        ),
    }
}

/// Claim up to `n` FREE slots (FREE → FILLING). The last quarter of the ring is the drains': an
/// interactive caller (any role, `embed_texts` in a loop) never takes it, so drains can always
/// submit; drains look there first.
fn claim(header: &'static Header, n: usize, priority: Priority) -> Vec<usize> {
    let slots = header.slots as usize;
    let reserved = slots - slots / 4;
    let order: Box<dyn Iterator<Item = usize>> = match priority {
        Priority::Interactive => Box::new(0..reserved),
        Priority::Drain => Box::new((reserved..slots).chain(0..reserved)),
    };
    let mut got = Vec::new();
    for i in order {
        if got.len() == n {
            break;
        }
        if slot(header, i).state.compare_exchange(FREE, FILLING, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            got.push(i);
        }
    }
    got
}

fn fill(s: &mut Slot, model: &str, text: &str, priority: Priority, pid: i32, procno: i32, seq: u64) {
    let text = embed_core::cut_at_char_boundary(text, TEXT_MAX);
    s.text[..text.len()].copy_from_slice(text.as_bytes());
    s.text_len = text.len() as u32;
    s.model[..model.len()].copy_from_slice(model.as_bytes());
    s.model_len = model.len() as u32;
    s.priority = priority as u32;
    s.seq = seq;
    s.dims = 0;
    s.owner_pid.store(pid, Ordering::Relaxed);
    s.owner_procno.store(procno, Ordering::Relaxed);
}

/// Wait on this process's latch (set by a worker that finished one of our slots).
fn wait(timeout: Duration) {
    // SAFETY: the standard latch wait of a backend; interrupts are handled by the caller
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis() as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// Wait until every slot is DONE or FAILED (or `limit` has passed); resubmit what a dead worker held.
fn collect(header: &'static Header, slots: &[usize], limit: Option<Duration>) -> Result<Vec<Vec<f32>>, SidecarError> {
    let mut lonely_since: Option<Instant> = None;
    let started = Instant::now();
    loop {
        let mut pending = false;
        for &i in slots {
            let s = slot(header, i);
            let state = s.state.load(Ordering::Acquire);
            match state {
                DONE | FAILED => {}
                _ => {
                    pending = true;
                    let dead = taker(state).is_some_and(|w| !alive(header.worker_pid[w].load(Ordering::Acquire)));
                    // its worker died mid-batch: hand it to the next one (transparent retry)
                    if dead && s.state.compare_exchange(state, SUBMITTED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        wake_workers(header);
                    }
                }
            }
        }
        if !pending {
            break;
        }
        if any_worker_alive(header) {
            lonely_since = None;
        } else if lonely_since.get_or_insert_with(Instant::now).elapsed() > NO_WORKER_GRACE {
            return Err(no_worker());
        }
        if limit.is_some_and(|l| started.elapsed() > l) {
            return Err(SidecarError::Refused {
                code: PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                message: format!("the inference service did not answer within {} s", started.elapsed().as_secs()),
                hint: "Look for pg_embed_sidecar inference lines in the server log; the pass is tried again later.",
            });
        }
        wait(Duration::from_millis(100));
        // cancel / statement_timeout: raises here; `Held` gives the slots back on the way out
        pgrx::check_for_interrupts!();
    }
    let mut out = Vec::with_capacity(slots.len());
    for &i in slots {
        let s = slot(header, i);
        if s.state.load(Ordering::Acquire) == FAILED {
            let text = |b: &[u8], n: u32| String::from_utf8_lossy(&b[..n as usize]).into_owned();
            let hint = Some(text(&s.hint, s.hint_len)).filter(|h| !h.is_empty());
            return Err(SidecarError::Remote { code: s.error_code, message: text(&s.message, s.message_len), hint });
        }
        out.push(s.vector[..s.dims as usize].to_vec());
    }
    Ok(out)
}

/// For the worker: wake the client that owns slot `s`.
pub fn wake_owner(s: &Slot) {
    let procno = s.owner_procno.load(Ordering::Relaxed);
    // SAFETY: sets that PGPROC's latch; a stale number only wakes some process once
    unsafe { pg_sys::ProcSendSignal(procno) };
}

/// For the worker: a finished or abandoned slot whose client is gone is freed.
pub fn owner_alive(s: &Slot) -> bool {
    alive(s.owner_pid.load(Ordering::Relaxed))
}

#[pgrx::pg_schema]
mod embed_sidecar {
    use std::sync::atomic::Ordering;

    use pgrx::prelude::*;

    /// The instance's inference service: workers running, texts embedded and seconds spent
    /// embedding since the server started. Busy seconds that grow as fast as the clock mean the
    /// service is the bottleneck; NULLs when the library is not preloaded.
    #[pg_extern(volatile, parallel_safe)]
    fn inference_service(
    ) -> TableIterator<'static, (name!(workers, Option<i32>), name!(texts, Option<i64>), name!(busy_seconds, Option<f64>))> {
        let row = match super::header() {
            Some(h) => (
                Some((0..super::WORKERS_MAX).filter(|&i| super::alive(h.worker_pid[i].load(Ordering::Acquire))).count() as i32),
                Some(h.texts_served.load(Ordering::Relaxed) as i64),
                Some(h.busy_us.load(Ordering::Relaxed) as f64 / 1e6),
            ),
            None => (None, None, None),
        };
        TableIterator::once(row)
    }
}
