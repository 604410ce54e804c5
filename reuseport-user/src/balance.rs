//! How evenly work is spread over workers.

/// Balance figures of per-worker counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Balance {
    /// Sum of the counts.
    pub total: u64,
    /// Busiest worker over the mean: 1 is perfect, 2 means the busiest
    /// worker did twice its share.
    pub max_over_mean: f64,
    /// Coefficient of variation: standard deviation over mean (population);
    /// 0 is perfect.
    pub cv: f64,
    /// Jain's fairness index `(Σx)² / (n·Σx²)`: 1 is perfect, `1/n` means
    /// one worker did everything.
    pub jain: f64,
}

/// The balance of `counts` (one per worker), or `None` when there are no
/// workers or nothing was counted.
pub fn balance(counts: &[u64]) -> Option<Balance> {
    let n = counts.len() as f64;
    let total: u64 = counts.iter().sum();
    if counts.is_empty() || total == 0 {
        return None;
    }
    let mean = total as f64 / n;
    let max = *counts.iter().max()? as f64;
    let var = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let sum_sq: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    Some(Balance {
        total,
        max_over_mean: max / mean,
        cv: var.sqrt() / mean,
        jain: (total as f64).powi(2) / (n * sum_sq),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_balance() {
        let b = balance(&[5, 5, 5, 5]).unwrap();
        assert_eq!(
            (b.total, b.max_over_mean, b.cv, b.jain),
            (20, 1.0, 0.0, 1.0)
        );
    }

    #[test]
    fn one_worker_does_everything() {
        let b = balance(&[0, 0, 12, 0]).unwrap();
        assert_eq!(b.max_over_mean, 4.0);
        assert!((b.jain - 0.25).abs() < 1e-12);
        assert!((b.cv - 3f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn nothing_counted() {
        assert_eq!(balance(&[]), None);
        assert_eq!(balance(&[0, 0]), None);
    }

    #[test]
    fn a_three_to_one_split() {
        let b = balance(&[75, 25]).unwrap();
        assert!((b.max_over_mean - 1.5).abs() < 1e-12);
        assert!((b.cv - 0.5).abs() < 1e-12);
        assert!((b.jain - 0.8).abs() < 1e-12);
    }
}
