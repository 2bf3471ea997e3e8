//! Drawing conversations from a spec.

use std::path::Path;
use std::sync::Arc;

use convoy_weights::ChatMessage;
use rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

use super::spec::{WorkloadKind, WorkloadSpec};
use super::text::synthetic_text;
use super::trace::read_trace;
use super::WorkloadError;

/// One turn: what the user sends and how long the reply may be.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    /// The user message.
    pub user: String,
    /// Seed the message was drawn from (the simulator derives its token ids from it).
    pub user_seed: u64,
    /// Its nominal length in tokens.
    pub user_tokens: usize,
    /// Reply budget.
    pub max_tokens: usize,
    /// Seconds between the previous reply's end and this message (0 for the first turn).
    pub think_s: f64,
    /// Trace replay: send at this many seconds from the start of the run, whatever the
    /// previous turn is doing.
    pub at_s: Option<f64>,
    /// Trace replay: the whole conversation to send (history as recorded).
    pub messages: Option<Vec<ChatMessage>>,
}

/// A conversation: an optional shared system prompt, then turns.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    /// Draw index (0, 1, ...).
    pub index: u64,
    /// Conversation id (routing key: sent as `X-Session-ID` and `user`).
    pub id: String,
    /// Persona or prefix index, when the system prompt is a shared one.
    pub persona: Option<usize>,
    /// The system prompt.
    pub system: Option<Arc<str>>,
    /// Seed of the system prompt's text.
    pub system_seed: u64,
    /// Its nominal length in tokens.
    pub system_tokens: usize,
    /// The turns, in order.
    pub turns: Vec<Turn>,
}

impl Conversation {
    /// The messages of turn `turn`, given the replies of the earlier turns.
    ///
    /// # Panics
    /// If `turn` is out of range or fewer than `turn` replies are given.
    pub fn messages(&self, turn: usize, replies: &[String]) -> Vec<ChatMessage> {
        if let Some(m) = &self.turns[turn].messages {
            return m.clone();
        }
        let mut out = Vec::with_capacity(2 * turn + 2);
        if let Some(s) = &self.system {
            out.push(ChatMessage::new("system", &**s));
        }
        for (t, reply) in self.turns[..turn].iter().zip(&replies[..turn]) {
            out.push(ChatMessage::new("user", &t.user));
            out.push(ChatMessage::new("assistant", reply));
        }
        out.push(ChatMessage::new("user", &self.turns[turn].user));
        out
    }
}

struct Shared {
    seed: u64,
    tokens: usize,
    text: Arc<str>,
}

/// A spec made ready to draw from: shared prompts drawn once, a trace read and grouped.
pub struct Workload {
    spec: WorkloadSpec,
    shared: Vec<Shared>,
    trace: Option<Vec<Conversation>>,
}

/// A stream seed for `(seed, lane, index)`: distinct streams for personas, conversations and
/// arrivals that do not depend on how many of the others were drawn.
pub(crate) fn stream_seed(seed: u64, lane: u64, index: u64) -> u64 {
    let mut z = seed
        ^ lane.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const LANE_SHARED: u64 = 1;
const LANE_CONVERSATION: u64 = 2;
pub(crate) const LANE_ARRIVAL: u64 = 3;

impl Workload {
    /// Prepare a validated spec (reads the trace for `kind = "trace"`).
    pub fn new(spec: WorkloadSpec) -> Result<Workload, WorkloadError> {
        spec.validate()?;
        let (count, dist) = match spec.kind {
            WorkloadKind::Chat => (spec.chat.personas, Some(&spec.chat.persona_tokens)),
            WorkloadKind::SharedPrefix => (
                spec.shared_prefix.prefixes,
                Some(&spec.shared_prefix.prefix_tokens),
            ),
            _ => (0, None),
        };
        let shared = (0..count)
            .map(|p| {
                let seed = stream_seed(spec.seed, LANE_SHARED, p as u64);
                let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
                let tokens = dist.map_or(1, |d| d.sample_len(&mut rng));
                let text = synthetic_text(seed, tokens);
                Shared {
                    seed,
                    tokens,
                    text: format!("You are persona {p}. {text}").into(),
                }
            })
            .collect();
        let trace = match (spec.kind, &spec.trace.path) {
            (WorkloadKind::Trace, Some(path)) => Some(group_trace(&spec, path)?),
            _ => None,
        };
        Ok(Workload {
            spec,
            shared,
            trace,
        })
    }

    /// The spec.
    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// How many conversations there are: `None` for the generated kinds (as many as asked).
    pub fn len(&self) -> Option<usize> {
        self.trace.as_ref().map(Vec::len)
    }

    /// Whether a trace has no conversations (never: an empty trace is refused).
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// Mean turns per conversation (for turning conversations/s into messages/s).
    pub fn mean_turns(&self) -> f64 {
        match (&self.trace, self.spec.kind) {
            (Some(t), _) => {
                t.iter().map(|c| c.turns.len()).sum::<usize>() as f64 / t.len().max(1) as f64
            }
            (None, WorkloadKind::Chat) => self.spec.chat.turns.mean().round().max(1.0),
            (None, _) => 1.0,
        }
    }

    /// Conversation `index` (the same for the same spec and index); `None` past a trace's end.
    pub fn conversation(&self, index: u64) -> Option<Conversation> {
        if let Some(t) = &self.trace {
            return t.get(index as usize).cloned();
        }
        let spec = &self.spec;
        let mut rng =
            Xoshiro256PlusPlus::seed_from_u64(stream_seed(spec.seed, LANE_CONVERSATION, index));
        let pick_shared = |rng: &mut Xoshiro256PlusPlus| {
            use rand_core::RngCore;
            (rng.next_u64() % self.shared.len().max(1) as u64) as usize
        };
        let (persona, n_turns) = match spec.kind {
            WorkloadKind::Chat => (
                Some(pick_shared(&mut rng)),
                spec.chat.turns.sample_len(&mut rng),
            ),
            WorkloadKind::SharedPrefix => (Some(pick_shared(&mut rng)), 1),
            _ => (None, 1),
        };
        let mut turns = Vec::with_capacity(n_turns);
        for t in 0..n_turns {
            let user_tokens = match spec.kind {
                WorkloadKind::Chat => spec.chat.user_tokens.sample_len(&mut rng),
                WorkloadKind::SharedPrefix => spec.shared_prefix.suffix_tokens.sample_len(&mut rng),
                _ => spec.random.prompt_tokens.sample_len(&mut rng),
            };
            let max_tokens = spec.max_tokens.sample_len(&mut rng);
            let think_s = if t == 0 || spec.kind != WorkloadKind::Chat {
                0.0
            } else {
                spec.chat.think_time_s.sample(&mut rng)
            };
            let user_seed = stream_seed(spec.seed ^ index, LANE_CONVERSATION, t as u64 + 1);
            turns.push(Turn {
                user: format!("[{index}.{t}] {}", synthetic_text(user_seed, user_tokens)),
                user_seed,
                user_tokens,
                max_tokens,
                think_s,
                at_s: None,
                messages: None,
            });
        }
        let shared = persona.and_then(|p| self.shared.get(p));
        Some(Conversation {
            index,
            id: format!("conv-{}-{index}", spec.seed),
            persona,
            system: shared.map(|s| s.text.clone()),
            system_seed: shared.map_or(0, |s| s.seed),
            system_tokens: shared.map_or(0, |s| s.tokens),
            turns,
        })
    }
}

/// A trace's lines grouped into conversations (ordered by their first line's time).
fn group_trace(spec: &WorkloadSpec, path: &Path) -> Result<Vec<Conversation>, WorkloadError> {
    let records = read_trace(path)?;
    let mut order: Vec<String> = Vec::new();
    let mut by_id: std::collections::HashMap<String, Vec<Turn>> = Default::default();
    let default_max = spec.max_tokens.mean().round().max(1.0) as usize;
    for r in records {
        let messages = r.chat();
        let user = messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let turn = Turn {
            user_tokens: user.split_whitespace().count().max(1),
            user,
            user_seed: 0,
            max_tokens: r.max_tokens.unwrap_or(default_max),
            think_s: 0.0,
            at_s: Some(r.t * spec.trace.time_scale),
            messages: Some(messages),
        };
        by_id
            .entry(r.conversation.clone())
            .or_insert_with(|| {
                order.push(r.conversation.clone());
                Vec::new()
            })
            .push(turn);
    }
    Ok(order
        .into_iter()
        .enumerate()
        .map(|(i, id)| Conversation {
            index: i as u64,
            turns: by_id.remove(&id).unwrap_or_default(),
            id,
            persona: None,
            system: None,
            system_seed: 0,
            system_tokens: 0,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat() -> WorkloadSpec {
        WorkloadSpec::parse(
            "kind = \"chat\"\nseed = 5\n[chat]\npersonas = 3\nturns = 4\n",
            Path::new("w.toml"),
        )
        .unwrap()
    }

    #[test]
    fn same_seed_same_conversations_and_history_grows() {
        let a = Workload::new(chat()).unwrap();
        let b = Workload::new(chat()).unwrap();
        for i in [0u64, 1, 17, 1000] {
            assert_eq!(a.conversation(i), b.conversation(i));
        }
        let c = a.conversation(3).unwrap();
        assert_eq!(c.turns.len(), 4);
        assert!(c.system_tokens >= 500 && c.system_tokens <= 2000);
        let replies: Vec<String> = (0..3).map(|i| format!("reply {i}")).collect();
        let m2 = c.messages(2, &replies);
        let m3 = c.messages(3, &replies);
        // Turn 3's prompt extends turn 2's: history grows, the prefix stays.
        assert_eq!(&m3[..m2.len()], &m2[..]);
        assert_eq!(m3.len(), 1 + 2 * 3 + 1);
        assert_eq!(m3[0].role, "system");
        // Personas are shared: with 3 personas, 20 conversations reuse them.
        let personas: std::collections::HashSet<_> = (0..20)
            .map(|i| a.conversation(i).unwrap().persona)
            .collect();
        assert!(personas.len() <= 3);
        // A different seed gives different conversations.
        let mut s = chat();
        s.seed = 6;
        assert_ne!(Workload::new(s).unwrap().conversation(3), a.conversation(3));
    }
}
