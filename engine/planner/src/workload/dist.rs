//! Distributions of lengths and times, as they are written in a spec.

use rand_distr::Distribution;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

use super::WorkloadError;

/// A distribution over non-negative numbers.
///
/// In a spec: a bare number is `fixed`; otherwise a table with `dist` and its parameters,
/// e.g. `{ dist = "uniform", min = 500, max = 2000 }`, `{ dist = "exponential", mean = 5.0 }`,
/// `{ dist = "lognormal", mean = 200, sigma = 0.6 }`, `{ dist = "normal", mean = 64, std = 16 }`
/// (drawn values below zero become zero; integer lengths are rounded and at least 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dist {
    /// Always this value.
    Fixed(f64),
    /// A named distribution.
    Named(NamedDist),
}

/// The named distributions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum NamedDist {
    /// Always `value`.
    Fixed {
        /// The value.
        value: f64,
    },
    /// Uniform on `[min, max]`.
    Uniform {
        /// Smallest value.
        min: f64,
        /// Largest value.
        max: f64,
    },
    /// Exponential with this mean.
    Exponential {
        /// The mean.
        mean: f64,
    },
    /// Log-normal with this mean (of the value, not of its logarithm) and shape `sigma`.
    Lognormal {
        /// Mean of the value.
        mean: f64,
        /// Standard deviation of the logarithm.
        sigma: f64,
    },
    /// Normal, clipped at zero.
    Normal {
        /// The mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
}

impl Dist {
    /// Check the parameters; `field` names the spec field in the error.
    pub fn validate(&self, field: &str) -> Result<(), WorkloadError> {
        let bad = |m: &str| Err(WorkloadError::invalid(field, m));
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        match self {
            Dist::Fixed(v) | Dist::Named(NamedDist::Fixed { value: v }) => {
                if !finite_nonneg(*v) {
                    return bad("must be a finite number >= 0");
                }
            }
            Dist::Named(NamedDist::Uniform { min, max }) => {
                if !finite_nonneg(*min) || !finite_nonneg(*max) || min > max {
                    return bad("uniform needs 0 <= min <= max");
                }
            }
            Dist::Named(NamedDist::Exponential { mean }) => {
                if !(mean.is_finite() && *mean > 0.0) {
                    return bad("exponential needs mean > 0");
                }
            }
            Dist::Named(NamedDist::Lognormal { mean, sigma }) => {
                if !(mean.is_finite() && *mean > 0.0 && sigma.is_finite() && *sigma >= 0.0) {
                    return bad("lognormal needs mean > 0 and sigma >= 0");
                }
            }
            Dist::Named(NamedDist::Normal { mean, std }) => {
                if !(finite_nonneg(*mean) && std.is_finite() && *std >= 0.0) {
                    return bad("normal needs mean >= 0 and std >= 0");
                }
            }
        }
        Ok(())
    }

    /// The mean of the distribution (of the clipped one for `normal`, approximately).
    pub fn mean(&self) -> f64 {
        match self {
            Dist::Fixed(v) | Dist::Named(NamedDist::Fixed { value: v }) => *v,
            Dist::Named(NamedDist::Uniform { min, max }) => (min + max) / 2.0,
            Dist::Named(NamedDist::Exponential { mean })
            | Dist::Named(NamedDist::Lognormal { mean, .. })
            | Dist::Named(NamedDist::Normal { mean, .. }) => *mean,
        }
    }

    /// One draw (validated specs only; an invalid one draws its mean or zero).
    pub fn sample(&self, rng: &mut Xoshiro256PlusPlus) -> f64 {
        let v = match self {
            Dist::Fixed(v) | Dist::Named(NamedDist::Fixed { value: v }) => *v,
            Dist::Named(NamedDist::Uniform { min, max }) => {
                rand_distr::Uniform::new_inclusive(*min, *max).map_or(*min, |d| d.sample(rng))
            }
            Dist::Named(NamedDist::Exponential { mean }) => {
                rand_distr::Exp::new(1.0 / mean).map_or(*mean, |d| d.sample(rng))
            }
            Dist::Named(NamedDist::Lognormal { mean, sigma }) => {
                // E[X] = exp(mu + sigma^2 / 2).
                let mu = mean.ln() - sigma * sigma / 2.0;
                rand_distr::LogNormal::new(mu, *sigma).map_or(*mean, |d| d.sample(rng))
            }
            Dist::Named(NamedDist::Normal { mean, std }) => {
                rand_distr::Normal::new(*mean, *std).map_or(*mean, |d| d.sample(rng))
            }
        };
        v.max(0.0)
    }

    /// A length in tokens: rounded, at least 1.
    pub fn sample_len(&self, rng: &mut Xoshiro256PlusPlus) -> usize {
        (self.sample(rng).round() as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    #[test]
    fn means_are_close_and_lengths_positive() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        for d in [
            Dist::Fixed(3.0),
            Dist::Named(NamedDist::Uniform {
                min: 10.0,
                max: 30.0,
            }),
            Dist::Named(NamedDist::Exponential { mean: 5.0 }),
            Dist::Named(NamedDist::Lognormal {
                mean: 200.0,
                sigma: 0.6,
            }),
            Dist::Named(NamedDist::Normal {
                mean: 64.0,
                std: 8.0,
            }),
        ] {
            d.validate("x").unwrap();
            let n = 20_000;
            let m: f64 = (0..n).map(|_| d.sample(&mut rng)).sum::<f64>() / n as f64;
            assert!((m - d.mean()).abs() < 0.05 * d.mean(), "{d:?}: {m}");
            assert!((0..100).all(|_| d.sample_len(&mut rng) >= 1));
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        for d in [
            Dist::Fixed(-1.0),
            Dist::Fixed(f64::NAN),
            Dist::Named(NamedDist::Uniform { min: 3.0, max: 1.0 }),
            Dist::Named(NamedDist::Exponential { mean: 0.0 }),
            Dist::Named(NamedDist::Lognormal {
                mean: 1.0,
                sigma: -1.0,
            }),
        ] {
            let e = d.validate("turns").unwrap_err();
            assert_eq!(e.code(), "workload_invalid");
            assert!(e.to_string().contains("turns"));
        }
    }
}
