//! The ring: the inference service's shared memory, and every move a slot makes in it.
//!
//! A slot moves FREE → FILLING (claimed by a client) → SUBMITTED → TAKEN by worker i → DONE /
//! FAILED → FREE (the client read it). A client that gives up takes back a slot that is not taken,
//! or marks a taken one ABANDONED for its worker to free. Every move is a compare-and-swap on the
//! slot's state word, and each is a method of `Slot` below, so nothing else in the crate changes a
//! state.
//!
//! Who may touch a slot's payload (the texts in, the vector or error out) follows from its state:
//! the client that claimed it while FILLING, the worker named in TAKEN/ABANDONED, the client again
//! once DONE/FAILED. The owner writes the payload before the state change that hands the slot on
//! (release) and the next owner reads it after seeing that state (acquire), so the payload needs no
//! lock. What others read while they do not own the slot (its owner's pid, its priority and
//! sequence, which a worker sorts by) are atomics. The payload sits in an `UnsafeCell` and is only
//! reached through the methods here, each saying which state makes it ours.

use std::cell::UnsafeCell;
use std::mem::size_of;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use pgrx::pg_sys;

use crate::gucs;
use crate::pg::compat;

/// Bytes of text a slot carries. The embedder cuts every input at 64 bytes per window token
/// before tokenising, so this covers windows up to 1,024 tokens; longer inputs are cut here at a
/// character boundary, which gives the same vector.
pub const TEXT_MAX: usize = 64 * 1024;
/// Most dimensions of a vector a slot carries back.
pub const DIMS_MAX: usize = 2048;
pub const MODEL_MAX: usize = 64;
const MESSAGE_MAX: usize = 512;
pub use gucs::INFERENCE_WORKERS_MAX as WORKERS_MAX;

const FREE: u32 = 0;
const FILLING: u32 = 1;
const SUBMITTED: u32 = 2;
const DONE: u32 = 4;
const FAILED: u32 = 5;
/// Taken by worker `i`: `TAKEN + i`; abandoned by its client while worker `i` had it: `ABANDONED + i`.
const TAKEN: u32 = 16;
const ABANDONED: u32 = TAKEN + WORKERS_MAX as u32;

fn taken_by(worker: usize) -> u32 {
    TAKEN + worker as u32
}
fn abandoned_by(worker: usize) -> u32 {
    ABANDONED + worker as u32
}
/// The worker a taken slot belongs to.
fn taker(state: u32) -> Option<usize> {
    (TAKEN..ABANDONED).contains(&state).then(|| (state - TAKEN) as usize)
}
/// The worker an abandoned slot belongs to.
fn abandoner(state: u32) -> Option<usize> {
    (ABANDONED..ABANDONED + WORKERS_MAX as u32).contains(&state).then(|| (state - ABANDONED) as usize)
}

/// Interactive requests (a session waiting for a query vector) go before drain batches.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Priority {
    Interactive = 0,
    Drain = 1,
}

#[repr(C)]
pub struct Header {
    worker_pid: [AtomicI32; WORKERS_MAX],
    worker_procno: [AtomicI32; WORKERS_MAX],
    next_seq: AtomicU64,
    /// Texts embedded and microseconds spent embedding them, all workers together, since start:
    /// `inference_service()` shows how busy the service is (a drain at its ceiling keeps it busy).
    texts_served: AtomicU64,
    busy_us: AtomicU64,
    /// Drain rounds put aside for a search that arrived while they ran (src/inference/worker.rs).
    preempted: AtomicU64,
    /// Written once, before any other process maps the ring.
    slots: u32,
}

/// What a slot carries: only its owner of the moment reads or writes it (see the module comment).
#[repr(C)]
struct Payload {
    model_len: u32,
    model: [u8; MODEL_MAX],
    text_len: u32,
    dims: u32,
    /// DONE: this text's share of the inference time of the call that embedded it, in
    /// microseconds (what a drain sizes its bulk windows by: src/bgw/drain_worker.rs)
    cost_us: u32,
    /// FAILED: the error's SQLSTATE (as pgrx numbers it), message and hint
    error_code: i32,
    message_len: u32,
    message: [u8; MESSAGE_MAX],
    hint_len: u32,
    hint: [u8; MESSAGE_MAX],
    vector: [f32; DIMS_MAX],
    text: [u8; TEXT_MAX],
}

#[repr(C)]
pub struct Slot {
    state: AtomicU32,
    owner_pid: AtomicI32,
    owner_procno: AtomicI32,
    priority: AtomicU32,
    seq: AtomicU64,
    /// Bytes of the text, for the worker to size its rounds before it owns the payload.
    text_len: AtomicU32,
    payload: UnsafeCell<Payload>,
}

// SAFETY: the payload is reached only by the process that owns the slot's current state (module
// comment); everything else in a slot is atomic.
unsafe impl Sync for Slot {}

/// A waiting slot as a worker sees it: the order is priority, then age.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Waiting {
    pub priority: u32,
    pub seq: u64,
    pub text_len: u32,
}

impl Waiting {
    pub fn interactive(&self) -> bool {
        self.priority == Priority::Interactive as u32
    }
}

/// A failure the worker carried back: SQLSTATE, message, hint.
pub struct Failure {
    pub code: i32,
    pub message: String,
    pub hint: Option<String>,
}

impl Slot {
    /// The payload, for the process that owns the slot's current state.
    ///
    /// # Safety
    /// The caller owns the slot's state (FILLING claimed by it, TAKEN/ABANDONED by it, or
    /// DONE/FAILED of a slot it submitted), so no other process touches the payload meanwhile,
    /// and it holds no other reference to the payload.
    #[allow(clippy::mut_from_ref)]
    unsafe fn payload(&self) -> &mut Payload {
        // SAFETY: exclusive by the caller's ownership of the state (see above)
        unsafe { &mut *self.payload.get() }
    }

    // ---- client side ----

    /// Whether the slot is FREE right now (a hint: another client may claim it the next moment).
    pub fn is_free(&self) -> bool {
        self.state.load(Ordering::Relaxed) == FREE
    }

    /// FREE → FILLING: the slot is this client's.
    pub fn try_claim(&self) -> bool {
        self.state.compare_exchange(FREE, FILLING, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// Fill a slot this client claimed and hand it to the workers (FILLING → SUBMITTED). The owner
    /// and the payload are written before the release that makes the slot visible.
    pub fn submit(&self, model: &str, text: &str, priority: Priority, seq: u64) {
        if self.state.load(Ordering::Acquire) != FILLING {
            return;
        }
        let text = embed_core::cut_at_char_boundary(text, TEXT_MAX);
        let model = embed_core::cut_at_char_boundary(model, MODEL_MAX);
        // SAFETY: FILLING, claimed by this client (try_claim): nobody else reads the payload
        let p = unsafe { self.payload() };
        p.text[..text.len()].copy_from_slice(text.as_bytes());
        p.text_len = text.len() as u32;
        p.model[..model.len()].copy_from_slice(model.as_bytes());
        p.model_len = model.len() as u32;
        p.dims = 0;
        p.cost_us = 0;
        // SAFETY: this process's own pid
        let (pid, procno) = (unsafe { pg_sys::MyProcPid }, compat::my_proc_number());
        self.owner_pid.store(pid, Ordering::Relaxed);
        self.owner_procno.store(procno, Ordering::Relaxed);
        self.priority.store(priority as u32, Ordering::Relaxed);
        self.seq.store(seq, Ordering::Relaxed);
        self.text_len.store(text.len() as u32, Ordering::Relaxed);
        // only this client moves a FILLING slot (tidy leaves FILLING alone), so this holds
        let _ = self.state.compare_exchange(FILLING, SUBMITTED, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// The answer, once the slot is DONE or FAILED: the vector and the inference time it took
    /// (`answer`). None while it is still on its way, and for a slot this process did not submit
    /// (whose answer is not its to read).
    pub fn outcome(&self) -> Option<Result<(Vec<f32>, Duration), Failure>> {
        let state = self.state.load(Ordering::Acquire);
        // SAFETY: this process's own pid
        let mine = self.owner_pid.load(Ordering::Relaxed) == unsafe { pg_sys::MyProcPid };
        if (state != DONE && state != FAILED) || !mine {
            return None;
        }
        // SAFETY: DONE/FAILED of a slot this process submitted (its pid, written before the
        // submit's release and seen after the answer's): the worker is done with it
        let p = unsafe { self.payload() };
        if state == DONE {
            return Some(Ok((p.vector[..p.dims as usize].to_vec(), Duration::from_micros(u64::from(p.cost_us)))));
        }
        let text = |b: &[u8], n: u32| String::from_utf8_lossy(&b[..n as usize]).into_owned();
        let hint = Some(text(&p.hint, p.hint_len)).filter(|h| !h.is_empty());
        Some(Err(Failure { code: p.error_code, message: text(&p.message, p.message_len), hint }))
    }

    /// A slot whose worker died while it held it goes back to the workers (TAKEN → SUBMITTED);
    /// says whether it did.
    pub fn requeue_if_worker_gone(&self, ring: &Ring) -> bool {
        let state = self.state.load(Ordering::Acquire);
        taker(state).is_some_and(|w| !ring.worker_alive(w))
            && self.state.compare_exchange(state, SUBMITTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The client gives the slot up: a taken slot becomes abandoned (its worker frees it), any
    /// other state of ours FREE.
    pub fn give_back(&self) {
        loop {
            let state = self.state.load(Ordering::Acquire);
            let next = taker(state).map_or(FREE, abandoned_by);
            if self.state.compare_exchange(state, next, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return;
            }
        }
    }

    // ---- worker side ----

    /// What a worker sorts and sizes rounds by, for a slot waiting for one.
    pub fn waiting(&self) -> Option<Waiting> {
        (self.state.load(Ordering::Acquire) == SUBMITTED).then(|| Waiting {
            priority: self.priority.load(Ordering::Relaxed),
            seq: self.seq.load(Ordering::Relaxed),
            text_len: self.text_len.load(Ordering::Relaxed),
        })
    }

    /// SUBMITTED → TAKEN by worker `me`; then `request` and `answer` are its to call.
    pub fn take(&self, me: usize) -> bool {
        self.state.compare_exchange(SUBMITTED, taken_by(me), Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// `(model, text)` of a slot worker `me` took.
    pub fn request(&self, me: usize) -> Option<(String, String)> {
        let state = self.state.load(Ordering::Acquire);
        if state != taken_by(me) && state != abandoned_by(me) {
            return None;
        }
        // SAFETY: taken (or abandoned) by worker `me`, which is this process
        let p = unsafe { self.payload() };
        Some((
            String::from_utf8_lossy(&p.model[..p.model_len as usize]).into_owned(),
            String::from_utf8_lossy(&p.text[..p.text_len as usize]).into_owned(),
        ))
    }

    /// Worker `me` answers a slot it took: the payload first, then TAKEN → DONE/FAILED and the
    /// client's latch. A slot its client abandoned meanwhile is freed instead. `cost`: the text's
    /// share of the inference time of the call that embedded it.
    pub fn answer(&self, me: usize, result: Result<&[f32], Failure>, cost: Duration) {
        let state = self.state.load(Ordering::Acquire);
        if state != taken_by(me) && state != abandoned_by(me) {
            return;
        }
        // SAFETY: taken (or abandoned) by worker `me`, which is this process
        let p = unsafe { self.payload() };
        let done = match result {
            Ok(v) if v.len() <= DIMS_MAX => {
                p.vector[..v.len()].copy_from_slice(v);
                p.dims = v.len() as u32;
                p.cost_us = u32::try_from(cost.as_micros()).unwrap_or(u32::MAX);
                DONE
            }
            Ok(v) => {
                let message = format!("{} dimensions exceed the inference service's {DIMS_MAX}", v.len());
                p.put_failure(&Failure {
                    code: pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED as i32,
                    message,
                    hint: None,
                });
                FAILED
            }
            Err(f) => {
                p.put_failure(&f);
                FAILED
            }
        };
        if self.state.compare_exchange(taken_by(me), done, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let procno = self.owner_procno.load(Ordering::Relaxed);
            compat::wake_proc(procno);
        } else {
            // the client gave up meanwhile (or resubmitted it, taking us for dead)
            let _ = self.state.compare_exchange(abandoned_by(me), FREE, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// What worker `me` held goes back: taken slots to the queue (their clients wait), abandoned
    /// ones FREE. A worker puts back what its predecessor held when it starts, and a drain round it
    /// put aside for a search.
    pub fn put_back(&self, me: usize) {
        let _ = self.state.compare_exchange(taken_by(me), SUBMITTED, Ordering::AcqRel, Ordering::Relaxed);
        let _ = self.state.compare_exchange(abandoned_by(me), FREE, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Free a slot nobody waits for any more: abandoned while a worker that has since died held
    /// it, or submitted/answered for a client that died. Never a FILLING slot: its owner fields may
    /// still be the previous client's (they are written at submit), so a dead pid there does not
    /// mean a dead owner, and freeing it would let two clients share the slot. A client cannot die
    /// between its claim and its submit without a crash, and a crash re-creates the ring.
    pub fn free_if_orphaned(&self, ring: &Ring) {
        let state = self.state.load(Ordering::Acquire);
        let orphan = match state {
            SUBMITTED | DONE | FAILED => !alive(self.owner_pid.load(Ordering::Relaxed)),
            _ => abandoner(state).is_some_and(|w| !ring.worker_alive(w)),
        };
        if orphan {
            let _ = self.state.compare_exchange(state, FREE, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

impl Payload {
    fn put_failure(&mut self, f: &Failure) {
        fn put(buf: &mut [u8], text: &str) -> u32 {
            let text = embed_core::cut_at_char_boundary(text, buf.len());
            buf[..text.len()].copy_from_slice(text.as_bytes());
            text.len() as u32
        }
        self.error_code = f.code;
        self.message_len = put(&mut self.message, &f.message);
        self.hint_len = put(&mut self.hint, f.hint.as_deref().unwrap_or(""));
    }
}

/// Whether a process exists.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists
    pid != 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The ring as mapped in this process.
#[derive(Clone, Copy)]
pub struct Ring {
    header: &'static Header,
}

/// Where the ring lies in this process's address space: set by the startup hook in the postmaster
/// and inherited by every child.
static BASE: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());

impl Ring {
    /// The ring, when the library was preloaded.
    pub fn attached() -> Option<Ring> {
        // SAFETY: BASE is null or points at the ring, set once by the startup hook before any
        // backend runs; shared memory is never moved or freed while processes live
        unsafe { BASE.load(Ordering::Acquire).as_ref() }.map(|header| Ring { header })
    }

    pub fn len(&self) -> usize {
        self.header.slots as usize
    }

    pub fn slot(&self, i: usize) -> &'static Slot {
        assert!(i < self.len(), "slot {i} outside the ring");
        let first = size_of::<Header>().next_multiple_of(64);
        // SAFETY: the ring was sized by ring_size(slots) with the slots right after the header's
        // padding, and i is in range; slots are shared only as `&Slot` (interior mutability)
        unsafe { &*(self.header as *const Header).cast::<u8>().add(first).cast::<Slot>().add(i) }
    }

    pub fn next_seq(&self) -> u64 {
        self.header.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn worker_alive(&self, w: usize) -> bool {
        alive(self.header.worker_pid[w].load(Ordering::Acquire))
    }

    pub fn workers_alive(&self) -> usize {
        (0..WORKERS_MAX).filter(|&w| self.worker_alive(w)).count()
    }

    pub fn wake_workers(&self) {
        for w in 0..WORKERS_MAX {
            if self.worker_alive(w) {
                compat::wake_proc(self.header.worker_procno[w].load(Ordering::Acquire));
            }
        }
    }

    /// Worker `me` is this process from now on (its procno first: a client that sees the pid
    /// finds the latch to set).
    pub fn register_worker(&self, me: usize) {
        // SAFETY: this process's own pid
        let (pid, procno) = (unsafe { pg_sys::MyProcPid }, compat::my_proc_number());
        self.header.worker_procno[me].store(procno, Ordering::Release);
        self.header.worker_pid[me].store(pid, Ordering::Release);
    }

    pub fn retire_worker(&self, me: usize) {
        self.header.worker_pid[me].store(0, Ordering::Release);
    }

    /// Count a round: called before its answers are handed back, so a client that has its vector
    /// finds it counted.
    pub fn count_round(&self, texts: usize, busy_us: u64) {
        self.header.busy_us.fetch_add(busy_us, Ordering::Relaxed);
        self.header.texts_served.fetch_add(texts as u64, Ordering::Release);
    }

    pub fn count_preempted(&self) {
        self.header.preempted.fetch_add(1, Ordering::Relaxed);
    }

    /// `(texts embedded, microseconds busy, drain rounds put aside)` since the server started.
    pub fn served(&self) -> (u64, u64, u64) {
        (
            self.header.texts_served.load(Ordering::Acquire),
            self.header.busy_us.load(Ordering::Relaxed),
            self.header.preempted.load(Ordering::Relaxed),
        )
    }

    /// Whether a search (or any interactive request) waits for a worker.
    pub fn interactive_waiting(&self) -> bool {
        (0..self.len()).any(|i| self.slot(i).waiting().is_some_and(|w| w.interactive()))
    }
}

// ---- shared memory: requested and created by hooks chained while preloading ----

static PREV_REQUEST: OnceLock<pg_sys::shmem_request_hook_type> = OnceLock::new();
static PREV_STARTUP: OnceLock<pg_sys::shmem_startup_hook_type> = OnceLock::new();

fn ring_size(slots: usize) -> usize {
    size_of::<Header>().next_multiple_of(64) + slots * size_of::<Slot>()
}

/// Ask for the ring; only while preloading (from `_PG_init`).
pub fn init() {
    // SAFETY: _PG_init runs in the postmaster while it loads shared_preload_libraries, before any
    // other process exists: reading the flag and chaining the hooks cannot race
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        let _ = PREV_REQUEST.set(pg_sys::shmem_request_hook);
        pg_sys::shmem_request_hook = Some(request_ring);
        let _ = PREV_STARTUP.set(pg_sys::shmem_startup_hook);
        pg_sys::shmem_startup_hook = Some(create_ring);
    }
}

/// # Safety
/// Called by the postmaster as its `shmem_request_hook`, once, while it sizes shared memory.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request_ring() {
    if let Some(prev) = PREV_REQUEST.get().copied().flatten() {
        // SAFETY: the hook that was installed before ours, called as the postmaster would
        unsafe { prev() };
    }
    // SAFETY: the only place PostgreSQL allows an add-in to ask for shared memory
    unsafe { pg_sys::RequestAddinShmemSpace(ring_size(gucs::inference_slots())) };
}

/// # Safety
/// Called as `shmem_startup_hook` in the postmaster (and in each child under EXEC_BACKEND) after
/// shared memory is created.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn create_ring() {
    if let Some(prev) = PREV_STARTUP.get().copied().flatten() {
        // SAFETY: the hook that was installed before ours, called as the postmaster would
        unsafe { prev() };
    }
    let slots = gucs::inference_slots();
    let size = ring_size(slots);
    // SAFETY: the sequence every add-in uses: under AddinShmemInitLock (a macro in C: the 22nd of
    // the main LWLocks, lwlocknames.txt) find or create the named segment; a new one is zeroed,
    // which makes every slot FREE and no worker registered, and its slot count written before the
    // lock is released and BASE published
    unsafe {
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base = pg_sys::ShmemInitStruct(c"pg_embed_sidecar inference ring".as_ptr(), size, &mut found);
        if !found {
            std::ptr::write_bytes(base.cast::<u8>(), 0, size);
            (*base.cast::<Header>()).slots = slots as u32;
        }
        BASE.store(base.cast(), Ordering::Release);
        pg_sys::LWLockRelease(init_lock);
    }
}
