//! Arrival processes: when conversations start.

use rand_distr::Distribution;
use rand_xoshiro::Xoshiro256PlusPlus;

use super::conversation::{stream_seed, LANE_ARRIVAL};
use super::spec::{ArrivalProcessKind, ArrivalSpec};

/// How conversations start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArrivalProcess {
    /// Open loop: start times from a renewal process.
    Open {
        /// Mean starts per second.
        rate: f64,
        /// Coefficient of variation of the gaps (1 = Poisson).
        cv: f64,
    },
    /// Closed loop: this many conversations alive at once.
    Closed {
        /// Conversations alive.
        concurrency: usize,
    },
}

impl From<&ArrivalSpec> for ArrivalProcess {
    fn from(a: &ArrivalSpec) -> ArrivalProcess {
        match a.process {
            ArrivalProcessKind::Poisson => ArrivalProcess::Open {
                rate: a.rate,
                cv: 1.0,
            },
            ArrivalProcessKind::Gamma => ArrivalProcess::Open {
                rate: a.rate,
                cv: a.cv,
            },
            ArrivalProcessKind::Closed => ArrivalProcess::Closed {
                concurrency: a.concurrency,
            },
        }
    }
}

/// Start times of an open process, in seconds from the start (the first one after a gap too).
pub struct Arrivals {
    rng: Xoshiro256PlusPlus,
    gap: rand_distr::Gamma<f64>,
    t: f64,
}

impl Arrivals {
    /// Start times at `rate` per second with gap coefficient of variation `cv`: gamma gaps of
    /// shape `1 / cv^2` and mean `1 / rate` (shape 1 is the exponential: Poisson).
    /// `None` unless `rate > 0` and `cv > 0`, both finite.
    pub fn new(rate: f64, cv: f64, seed: u64) -> Option<Arrivals> {
        if !(rate.is_finite() && rate > 0.0 && cv.is_finite() && cv > 0.0) {
            return None;
        }
        let shape = 1.0 / (cv * cv);
        let scale = 1.0 / (rate * shape);
        Some(Arrivals {
            rng: rand_core::SeedableRng::seed_from_u64(stream_seed(seed, LANE_ARRIVAL, 0)),
            gap: rand_distr::Gamma::new(shape, scale).ok()?,
            t: 0.0,
        })
    }
}

impl Iterator for Arrivals {
    type Item = f64;
    fn next(&mut self) -> Option<f64> {
        self.t += self.gap.sample(&mut self.rng);
        Some(self.t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_burstiness() {
        for cv in [1.0, 3.0] {
            let times: Vec<f64> = Arrivals::new(4.0, cv, 9).unwrap().take(40_000).collect();
            let rate = times.len() as f64 / times.last().unwrap();
            assert!((rate - 4.0).abs() < 0.2, "cv {cv}: rate {rate}");
            let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            let got_cv = var.sqrt() / mean;
            assert!(
                (got_cv - cv).abs() < 0.15 * cv,
                "cv {cv}: measured {got_cv}"
            );
        }
        let a: Vec<f64> = Arrivals::new(2.0, 1.0, 1).unwrap().take(5).collect();
        let b: Vec<f64> = Arrivals::new(2.0, 1.0, 1).unwrap().take(5).collect();
        assert_eq!(a, b);
        assert!(Arrivals::new(0.0, 1.0, 1).is_none());
    }
}
