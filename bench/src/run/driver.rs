//! Playing a workload against a target for one offered load.
//!
//! Open loop: conversations start at the arrival process's times until `duration`; closed
//! loop: `concurrency` conversations are alive at once, each ended one starting the next until
//! `duration`; trace: each line is sent at its timestamp. After `duration` no conversation
//! starts and no new turn is sent; the turns in flight finish and are counted, so the run
//! ends when the last of them does (an open loop never before `duration`). A failed turn is
//! counted and its conversation goes on with an empty reply in its history (as a user would
//! retry).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_planner::workload::{ArrivalProcess, Arrivals, Conversation, Workload};
use parking_lot::Mutex;
use tokio::task::JoinSet;

use super::record::Recorder;
use super::target::{Target, TurnRequest};

/// One run's settings.
pub struct Phase {
    /// How conversations start.
    pub process: ArrivalProcess,
    /// Seed of the arrival times.
    pub seed: u64,
    /// Window in which conversations and turns start.
    pub duration: Duration,
    /// At most this many conversations.
    pub max_conversations: u64,
}

/// Shared state of a phase's tasks.
struct Shared {
    target: Target,
    workload: Arc<Workload>,
    recorder: Arc<Mutex<Recorder>>,
    start: Instant,
    deadline: Instant,
    in_flight: AtomicU64,
}

/// Play a phase; returns the time from the first send to the last end.
pub async fn play(
    target: Target,
    workload: Arc<Workload>,
    recorder: Arc<Mutex<Recorder>>,
    phase: &Phase,
    progress: Option<indicatif::ProgressBar>,
) -> Duration {
    let start = Instant::now();
    let shared = Arc::new(Shared {
        target,
        workload,
        recorder,
        start,
        deadline: start + phase.duration,
        in_flight: AtomicU64::new(0),
    });
    let ticker = progress.map(|bar| {
        let s = shared.clone();
        tokio::spawn(async move {
            // Off a terminal the bar draws nothing: a plain line every few seconds instead, so
            // a log file shows the run going on.
            let mut next_line = Instant::now();
            loop {
                let (done, failed) = s.recorder.lock().counts();
                let elapsed = s.start.elapsed();
                bar.set_position(elapsed.as_secs().min(bar.length().unwrap_or(0)));
                let message = format!(
                    "{} done, {} failed, {} in flight{}",
                    done,
                    failed,
                    s.in_flight.load(Ordering::Relaxed),
                    if Instant::now() >= s.deadline {
                        " (draining)"
                    } else {
                        ""
                    }
                );
                if bar.is_hidden() && Instant::now() >= next_line {
                    eprintln!(
                        "{} {}/{} s  {message}",
                        bar.prefix(),
                        bar.position(),
                        bar.length().unwrap_or(0)
                    );
                    next_line += Duration::from_secs(5);
                }
                bar.set_message(message);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });
    let mut tasks = JoinSet::new();
    let is_trace = shared.workload.len().is_some();
    let limit = shared.workload.len().map_or(phase.max_conversations, |n| {
        (n as u64).min(phase.max_conversations)
    });
    if is_trace {
        for i in 0..limit {
            let Some(c) = shared.workload.conversation(i) else {
                break;
            };
            tasks.spawn(conversation(shared.clone(), c));
        }
    } else {
        match phase.process {
            ArrivalProcess::Open { rate, cv } => {
                let times = Arrivals::new(rate, cv, phase.seed).into_iter().flatten();
                for (i, t) in (0..limit).zip(times) {
                    let at = start + Duration::from_secs_f64(t);
                    if at >= shared.deadline {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                    let Some(c) = shared.workload.conversation(i) else {
                        break;
                    };
                    tasks.spawn(conversation(shared.clone(), c));
                }
                // The window lasts its whole duration even when its arrivals end sooner (none
                // in its last seconds, or --conversations reached): throughput is over it.
                tokio::time::sleep_until(shared.deadline.into()).await;
            }
            ArrivalProcess::Closed { concurrency } => {
                let next = Arc::new(AtomicU64::new(0));
                for _ in 0..concurrency {
                    let (s, next) = (shared.clone(), next.clone());
                    tasks.spawn(async move {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= limit || Instant::now() >= s.deadline {
                                break;
                            }
                            let Some(c) = s.workload.conversation(i) else {
                                break;
                            };
                            conversation(s.clone(), c).await;
                        }
                    });
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(t) = ticker {
        t.abort();
    }
    start.elapsed()
}

/// Play one conversation's turns.
async fn conversation(s: Arc<Shared>, c: Conversation) {
    s.recorder.lock().conversation_started();
    let mut session = s.target.session();
    let mut replies: Vec<String> = Vec::with_capacity(c.turns.len());
    let spec = s.workload.spec();
    for (i, turn) in c.turns.iter().enumerate() {
        let send_at = match turn.at_s {
            Some(at) => s.start + Duration::from_secs_f64(at),
            None => Instant::now() + Duration::from_secs_f64(turn.think_s),
        };
        if i > 0 && send_at >= s.deadline {
            break;
        }
        tokio::time::sleep_until(send_at.into()).await;
        let req = TurnRequest {
            id: format!("{}-t{i}", c.id),
            conversation: c.id.clone(),
            messages: c.messages(i, &replies),
            max_tokens: turn.max_tokens,
            ignore_eos: spec.ignore_eos,
            temperature: spec.temperature,
        };
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = s.target.send(&mut session, &req).await;
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(o) => {
                s.recorder.lock().completed(i, &o);
                replies.push(o.text);
            }
            Err(e) => {
                tracing::debug!(request = %req.id, error = %e, "request failed");
                s.recorder.lock().failed(&e.code);
                replies.push(String::new());
            }
        }
    }
}
