//! A small spinning thread pool for the kernels' parallel loops.
//!
//! A decode step runs ~150 parallel loops of a few microseconds each; waking sleeping threads
//! through the OS for each one costs more than the work. Here the calling thread publishes a
//! job (an item count and a closure), workers that are spinning pick items off an atomic
//! counter, and the caller works too and returns when every item is done. Workers spin for a
//! while after each job, then park until the next one.
//!
//! # Unsafe code and its invariants
//!
//! A job lives on the submitter's stack and its closure is borrowed for the duration of
//! [`parallel_for`]; workers reach both through raw pointers (`Pool::job`, `Job::body`, whose
//! lifetime is erased to `'static`). That is sound because of these invariants:
//! 1. One job at a time: submission is serialised by a mutex, so concurrent callers such as
//!    parallel tests simply queue. (A `parallel_for` called from inside a job's item runs its
//!    items inline on that thread instead: it never waits for the mutex its own job holds.)
//! 2. A worker increments `active` *before* it loads `Pool::job` and decrements it only after
//!    its last use of the job; the submitter stores a null `Pool::job` and then waits for
//!    `active == 0` before it returns. All four are `SeqCst`, so a worker that loaded the
//!    job's pointer is counted in `active` when the submitter looks: the job and the closure
//!    outlive every dereference of the pointers.
//! 3. The submitter also waits for `done == n` first: every item has finished, so nothing the
//!    closure borrows is used after `parallel_for` returns.
//! 4. Items are handed out exactly once (`Job::next` is a `fetch_add` counter), and a
//!    panicking item is caught and still counted, so the waits above always end; the panic is
//!    re-raised on the submitter once the job is unpublished.
//!
//! What the items share beyond the closure's captures (output buffers written through
//! `SendPtr`) is the callers' business: each caller's `SAFETY` comment says why its
//! items access disjoint parts.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;
use std::thread::Thread;
use std::time::{Duration, Instant};

type Body<'a> = dyn Fn(usize) + Sync + 'a;

struct Job {
    body: *const Body<'static>,
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Set when an item panicked; the submitter re-raises once every item is accounted for.
    panicked: AtomicBool,
}

struct Pool {
    job: AtomicPtr<Job>,
    epoch: AtomicUsize,
    /// Workers between "about to read the job pointer" and "done with that job".
    active: AtomicUsize,
    submit: Mutex<()>,
    workers: Vec<Thread>,
    parked: Vec<AtomicBool>,
}

static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread is running items of a job (a worker, or a submitter inside its own
    /// job): a nested `parallel_for` then runs inline.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}
static POOL: OnceLock<Pool> = OnceLock::new();

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(300);

/// Set the number of compute threads (caller included). Takes effect only before the first
/// parallel loop runs; returns whether it did.
pub fn set_num_threads(n: usize) -> bool {
    if POOL.get().is_some() {
        return false;
    }
    THREADS.store(n.max(1), Ordering::SeqCst);
    true
}

/// Number of compute threads, caller included.
pub fn num_threads() -> usize {
    pool().workers.len() + 1
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = match THREADS.load(Ordering::SeqCst) {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let parked: Vec<AtomicBool> = (1..n).map(|_| AtomicBool::new(false)).collect();
        let mut workers = Vec::new();
        for w in 1..n {
            let handle = std::thread::Builder::new()
                .name(format!("convoy-kernel-{w}"))
                .spawn(move || worker(w - 1))
                .expect("spawn kernel worker");
            workers.push(handle.thread().clone());
        }
        Pool {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            submit: Mutex::new(()),
            workers,
            parked,
        }
    })
}

fn run_items(job: &Job) {
    // SAFETY: `job.body` points at the submitter's closure, which outlives the job (invariants
    // 2 and 3 in the module docs): `job` itself is live, since its submitter still waits for
    // us, so the closure is too.
    let body = unsafe { &*job.body };
    let mut count = 0;
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n {
            break;
        }
        // A panicking item still counts as done, so nobody waits for it forever; the submitter
        // re-raises the panic after the job is unpublished.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(i))).is_err() {
            job.panicked.store(true, Ordering::SeqCst);
        }
        count += 1;
    }
    if count > 0 {
        job.done.fetch_add(count, Ordering::Release);
    }
}

fn worker(index: usize) {
    IN_JOB.with(|j| j.set(true));
    let pool = loop {
        if let Some(p) = POOL.get() {
            break p;
        }
        std::thread::yield_now();
    };
    let mut seen = 0;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = pool.epoch.load(Ordering::Acquire);
        if epoch != seen {
            seen = epoch;
            pool.active.fetch_add(1, Ordering::SeqCst);
            let job = pool.job.load(Ordering::SeqCst);
            if !job.is_null() {
                // SAFETY: a non-null `job` points at a published job on its submitter's stack;
                // the submitter unpublishes it and then waits for `active` to drop to zero
                // before the job goes out of scope, and we counted ourselves in before reading
                // the pointer (invariant 2), so it stays live until our `fetch_sub` below.
                run_items(unsafe { &*job });
            }
            pool.active.fetch_sub(1, Ordering::SeqCst);
            idle_since = Instant::now();
        } else if spins & 255 != 0 || idle_since.elapsed() < SPIN {
            // Read the clock only every 256 spins: it is a system call's worth of work.
            spins = spins.wrapping_add(1);
            std::hint::spin_loop();
        } else {
            pool.parked[index].store(true, Ordering::SeqCst);
            if pool.epoch.load(Ordering::SeqCst) == seen {
                std::thread::park_timeout(Duration::from_millis(50));
            }
            pool.parked[index].store(false, Ordering::SeqCst);
            idle_since = Instant::now();
        }
    }
}

/// Run `body(i)` for every `i` in `0..n`, spread over the pool; returns when all are done.
/// Called from inside another `parallel_for`'s item, it runs its items inline, in order.
///
/// # Panics
/// If an item panics: the other items still run, then the panic is re-raised here (as "a
/// kernel work item panicked" when the item ran on a worker). Also if the pool's worker
/// threads cannot be spawned, on the first call.
pub fn parallel_for(n: usize, body: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    if n == 0 {
        return;
    }
    if n == 1 || pool.workers.is_empty() || IN_JOB.with(Cell::get) {
        (0..n).for_each(body);
        return;
    }
    let _guard = pool.submit.lock();
    // SAFETY: only a raw pointer changes type (same trait object, same layout and vtable, a
    // longer lifetime parameter); nothing is dereferenced here. The erased lifetime is never
    // relied on: workers dereference the pointer only while this call waits (invariants 2 and
    // 3 in the module docs), and the job is unpublished before we return.
    let body_static: *const Body<'static> =
        unsafe { std::mem::transmute::<*const Body<'_>, *const Body<'static>>(body) };
    let job = Job {
        body: body_static,
        n,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    };
    pool.job
        .store(&job as *const Job as *mut Job, Ordering::Release);
    pool.epoch.fetch_add(1, Ordering::SeqCst);
    for (w, t) in pool.workers.iter().enumerate() {
        if pool.parked[w].load(Ordering::SeqCst) {
            t.unpark();
        }
    }
    IN_JOB.with(|j| j.set(true));
    run_items(&job);
    IN_JOB.with(|j| j.set(false));
    while job.done.load(Ordering::Acquire) < n {
        std::hint::spin_loop();
    }
    pool.job.store(std::ptr::null_mut(), Ordering::SeqCst);
    while pool.active.load(Ordering::SeqCst) != 0 {
        std::hint::spin_loop();
    }
    if job.panicked.load(Ordering::SeqCst) {
        panic!("a kernel work item panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_exactly_once_even_from_concurrent_callers() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for round in 0..200 {
                        let n = 1 + round % 37;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        parallel_for(n, &|i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_nested_parallel_for_runs_inline_instead_of_deadlocking() {
        let hits: Vec<AtomicUsize> = (0..16 * 8).map(|_| AtomicUsize::new(0)).collect();
        parallel_for(16, &|i| {
            parallel_for(8, &|j| {
                hits[i * 8 + j].fetch_add(1, Ordering::Relaxed);
            });
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panicking_item_is_reported_to_the_caller_and_the_pool_goes_on() {
        let r = std::panic::catch_unwind(|| {
            parallel_for(64, &|i| {
                if i == 37 {
                    panic!("boom");
                }
            })
        });
        assert!(r.is_err(), "the panic reaches the caller");
        let hits = AtomicUsize::new(0);
        parallel_for(64, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 64);
    }
}
