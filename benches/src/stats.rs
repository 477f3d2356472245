//! Order statistics of a handful of samples.

use serde::{Deserialize, Serialize};

/// Median, extremes and 90th percentile of a sample set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// 90th percentile, nearest-rank method (a value that was actually measured).
    pub p90: f64,
}

/// The samples sorted ascending, NaNs dropped.
fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Median of `values` (NaNs ignored); `None` when there is none.
pub fn median(values: &[f64]) -> Option<f64> {
    let v = sorted(values);
    median_sorted(&v)
}

fn median_sorted(v: &[f64]) -> Option<f64> {
    let n = v.len();
    if n == 0 {
        return None;
    }
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The `p`-th percentile (0 < p ≤ 100) by the nearest-rank method: the smallest sample
/// such that at least `p` % of the samples are less than or equal to it.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let v = sorted(values);
    percentile_sorted(&v, p)
}

fn percentile_sorted(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

/// All of [`Summary`] at once; `None` for an empty set.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let v = sorted(values);
    Some(Summary {
        n: v.len(),
        median: median_sorted(&v)?,
        min: *v.first()?,
        max: *v.last()?,
        p90: percentile_sorted(&v, 90.0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0, 5.0]), Some(3.0));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 90.0), Some(9.0));
        assert_eq!(percentile(&v, 100.0), Some(10.0));
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&v, 1.0), Some(1.0));
        let v: Vec<f64> = (1..=30).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 90.0), Some(27.0));
        assert_eq!(percentile(&[42.0], 90.0), Some(42.0));
        assert_eq!(percentile(&[], 90.0), None);
        assert_eq!(percentile(&v, 0.0), None);
        assert_eq!(percentile(&v, 101.0), None);
    }

    #[test]
    fn summary() {
        let s = summarize(&[5.0, 1.0, 9.0, 3.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                n: 4,
                median: 4.0,
                min: 1.0,
                max: 9.0,
                p90: 9.0
            }
        );
        assert_eq!(summarize(&[]), None);
    }
}
