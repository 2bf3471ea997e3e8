//! What the model runner needs to draw a request's tokens. The scheduler carries it from
//! admission to the runner in [`crate::SchedulerOutput::new_requests`], so the runner learns of
//! a request from the step that first schedules it, never from a side call.
//!
//! Stopping (stop ids, `max_tokens`) is the scheduler's rule and lives on the request; stop
//! strings are the engine's (they need text). This is only the draw.

/// Sampling parameters of one request, as the runner uses them.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingSpec {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the request's random stream; `None` lets the runner pick one.
    pub seed: Option<u64>,
    /// Return log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingSpec {
    /// Greedy, no log-probabilities.
    fn default() -> Self {
        SamplingSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingSpec {
    /// Whether the draw is an argmax (no random stream used).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}
