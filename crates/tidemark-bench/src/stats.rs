//! Summaries of repeated measurements: the median, and the spread as min and max.

/// The median and spread of some samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// The middle sample (the mean of the two middle ones for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarize `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => *sorted.get(n / 2)?,
            _ => (*sorted.get(n / 2 - 1)? + *sorted.get(n / 2)?) / 2.0,
        };
        Some(Summary { median, min: *sorted.first()?, max: *sorted.last()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[3.0]), Some(Summary { median: 3.0, min: 3.0, max: 3.0 }));
        assert_eq!(Summary::of(&[5.0, 1.0, 3.0]), Some(Summary { median: 3.0, min: 1.0, max: 5.0 }));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 8.0]), Some(Summary { median: 3.0, min: 1.0, max: 8.0 }));
    }
}
