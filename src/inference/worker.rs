//! The inference workers (`pg_embed_sidecar.inference_workers`, default 1): background workers
//! connected to no database, each holding one embedder per model in use (src/model.rs)
//! and serving the ring of src/service.rs. Each round takes what is waiting, interactive requests
//! first (all of them) and otherwise a few drain texts (16, or 4 while searches keep arriving), so
//! a search waits behind at most one small drain batch; the embedder sorts by length and cuts by
//! the token budget. Restarted by
//! the postmaster after 1 s if it dies; clients resubmit what it held.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::bgworkers::*;
use pgrx::prelude::*;

use crate::error::SidecarError;
use crate::gucs;
use crate::inference::client::{self, Header, Priority, Slot, DONE, FAILED, FREE, SUBMITTED};

/// Most drain texts in one round: a search that arrives meanwhile waits for at most this many.
/// Rounds of 16 embed as fast as rounds of 64 (`embed_ceiling --window`), while a round of 64
/// kept searches waiting ~0.25 s during a backfill.
const DRAIN_ROUND: usize = 16;
/// While searches keep arriving (one served within `SEARCHES_RECENT`), rounds shrink to this:
/// a search then waits ~15 ms of drain work instead of ~60, and the drain runs at ~0.76× meanwhile.
const DRAIN_ROUND_BUSY: usize = 4;
const SEARCHES_RECENT: Duration = Duration::from_secs(1);
/// While both wait, one round in this many serves drain texts before interactive ones: sessions
/// calling `embed_texts` in a loop (any role may) must not starve every database's drain.
const DRAIN_SHARE: u64 = 4;

pub fn register() {
    // SAFETY: reading a flag the postmaster sets while loading shared_preload_libraries
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    for i in 0..gucs::inference_workers() {
        BackgroundWorkerBuilder::new(&format!("pg_embed_sidecar inference {i}"))
            .set_type("pg_embed_sidecar inference")
            .set_library("pg_embed_sidecar")
            .set_function("pg_embed_sidecar_inference_main")
            .set_argument(Some(pg_sys::Datum::from(i)))
            // connected to no database (like the launcher): listed in pg_stat_activity
            .enable_spi_access()
            // a hot standby serves embed_text and search too
            .set_start_time(BgWorkerStartTime::ConsistentState)
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_embed_sidecar_inference_main(arg: pg_sys::Datum) {
    let me = arg.value().min(client::WORKERS_MAX - 1);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    client::become_worker();
    let Some(header) = client::header() else { return };
    // SAFETY: this process's own pid and PGPROC number
    let (pid, procno) = unsafe { (pg_sys::MyProcPid, (*pg_sys::MyProc).pgprocno) };
    // what a predecessor in this place held goes back to the queue (its clients may be waiting)
    for i in 0..header.slots as usize {
        let s = client::slot(header, i);
        let _ = s.state.compare_exchange(client::taken_by(me), SUBMITTED, Ordering::AcqRel, Ordering::Relaxed);
        let _ = s.state.compare_exchange(client::abandoned_by(me), FREE, Ordering::AcqRel, Ordering::Relaxed);
    }
    header.worker_procno[me].store(procno, Ordering::Release);
    header.worker_pid[me].store(pid, Ordering::Release);
    log!("pg_embed_sidecar: inference worker {me} started ({} threads)", gucs::embed_settings(None).intra_threads);
    let mut nap = Duration::ZERO;
    let mut last_search: Option<Instant> = None;
    let mut rounds: u64 = 0;
    while BackgroundWorker::wait_latch(Some(nap)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to reload postgresql.conf
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        tidy(header);
        let searching = last_search.is_some_and(|t| t.elapsed() < SEARCHES_RECENT);
        rounds += 1;
        let drain_first = rounds % DRAIN_SHARE == 0;
        let (batch, interactive) = take(header, me, if searching { DRAIN_ROUND_BUSY } else { DRAIN_ROUND }, drain_first);
        if interactive {
            last_search = Some(Instant::now());
        }
        nap = if batch.is_empty() { Duration::from_secs(1) } else { Duration::ZERO };
        serve(header, me, &batch);
    }
    header.worker_pid[me].store(0, Ordering::Release);
    // exit code 1: the postmaster starts it again after its restart time (0 would retire it)
    // SAFETY: ends this process through Postgres' normal exit path
    unsafe { pg_sys::proc_exit(1) };
}

/// Free what nobody waits for any more: abandoned slots (the client gave up) and slots whose
/// client died. Never a FILLING slot: its owner pid may still be the previous client's (it is
/// written after the claim), so a dead pid there does not mean a dead owner, and freeing it would
/// let two clients share the slot. A client cannot die between its claim and its submit without
/// a crash, and a crash re-creates the ring.
fn tidy(header: &'static Header) {
    for i in 0..header.slots as usize {
        let s = client::slot(header, i);
        let state = s.state.load(Ordering::Acquire);
        let orphan = match state {
            SUBMITTED | DONE | FAILED => !client::owner_alive(s),
            // abandoned while a worker that has since died held it
            _ => client::abandoner(state).is_some_and(|w| !client::alive(header.worker_pid[w].load(Ordering::Acquire))),
        };
        if orphan {
            let _ = s.state.compare_exchange(state, FREE, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// Take this round's slots (SUBMITTED → TAKEN): every interactive request waiting, or else the
/// oldest `drain_round` drain requests; with `drain_first`, drain requests first when any wait.
/// Also says whether they are interactive.
fn take(header: &'static Header, me: usize, drain_round: usize, drain_first: bool) -> (Vec<usize>, bool) {
    let mut waiting: Vec<(u32, u64, usize)> = (0..header.slots as usize)
        .filter_map(|i| {
            let s = client::slot(header, i);
            (s.state.load(Ordering::Acquire) == SUBMITTED).then(|| (s.priority, s.seq, i))
        })
        .collect();
    waiting.sort_unstable();
    let mut interactive = waiting.iter().take_while(|w| w.0 == Priority::Interactive as u32).count();
    if drain_first && interactive < waiting.len() {
        waiting.drain(..interactive);
        interactive = 0;
    }
    let limit = if interactive > 0 { interactive } else { drain_round };
    let mut taken = Vec::new();
    for (_, _, i) in waiting.into_iter().take(limit) {
        let s = client::slot(header, i);
        if s.state.compare_exchange(SUBMITTED, client::taken_by(me), Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            taken.push(i);
        }
    }
    (taken, interactive > 0)
}

/// Embed the taken slots, one call per model; count them in the header; then hand each result
/// back. The counters come first: a client that has its vector must find it counted.
fn serve(header: &'static Header, me: usize, taken: &[usize]) {
    if taken.is_empty() {
        return;
    }
    let busy = Instant::now();
    let mut by_model: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for &i in taken {
        let s = client::slot(header, i);
        by_model.entry(String::from_utf8_lossy(&s.model[..s.model_len as usize]).into_owned()).or_default().push(i);
    }
    let mut results: Vec<(usize, Result<Vec<f32>, SidecarError>)> = Vec::with_capacity(taken.len());
    for (model, slots) in by_model {
        let texts: Vec<String> = slots
            .iter()
            .map(|&i| {
                let s = client::slot(header, i);
                String::from_utf8_lossy(&s.text[..s.text_len as usize]).into_owned()
            })
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        match crate::inference::embed_many_with(&model, &refs) {
            Ok(vectors) => results.extend(slots.into_iter().zip(vectors.into_iter().map(Ok))),
            // one text may be the cause: each alone, so the others still get their vector
            Err(_) if slots.len() > 1 => {
                for (i, text) in slots.into_iter().zip(&refs) {
                    results.push((i, crate::inference::embed_many_with(&model, &[text]).map(|mut v| v.pop().unwrap_or_default())));
                }
            }
            Err(e) => results.push((slots[0], Err(e))),
        }
    }
    header.busy_us.fetch_add(busy.elapsed().as_micros() as u64, Ordering::Relaxed);
    header.texts_served.fetch_add(taken.len() as u64, Ordering::Release);
    for (i, result) in results {
        finish(client::slot(header, i), me, result);
    }
}

fn finish(s: &mut Slot, me: usize, result: Result<Vec<f32>, SidecarError>) {
    let state = match result {
        Ok(v) if v.len() <= client::DIMS_MAX => {
            s.vector[..v.len()].copy_from_slice(&v);
            s.dims = v.len() as u32;
            DONE
        }
        Ok(v) => fail(s, &SidecarError::Sql(format!("{} dimensions exceed the service's {}", v.len(), client::DIMS_MAX))),
        Err(e) => fail(s, &e),
    };
    if s.state.compare_exchange(client::taken_by(me), state, Ordering::AcqRel, Ordering::Acquire).is_ok() {
        client::wake_owner(s);
    } else {
        // the client gave up meanwhile (or a client resubmitted it, taking us for dead)
        let _ = s.state.compare_exchange(client::abandoned_by(me), FREE, Ordering::AcqRel, Ordering::Relaxed);
    }
}

fn fail(s: &mut Slot, e: &SidecarError) -> u32 {
    let put = |buf: &mut [u8], text: &str| -> u32 {
        let text = embed_core::cut_at_char_boundary(text, buf.len());
        buf[..text.len()].copy_from_slice(text.as_bytes());
        text.len() as u32
    };
    s.error_code = e.sqlstate() as i32;
    s.message_len = put(&mut s.message, &e.to_string());
    s.hint_len = put(&mut s.hint, e.hint().unwrap_or(""));
    FAILED
}
