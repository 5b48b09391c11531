//! The search for the highest rate a server sustains: double from a start rate until a step
//! fails (or the ceiling is reached), then bisect between the last rate that passed and the
//! first that failed until they are within a given ratio. When the start rate already fails,
//! halve until a step passes. Each step is one run of the caller's closure; the whole trace
//! is kept so a report can show how the answer was reached.

/// One step of the search.
#[derive(Debug, Clone, PartialEq)]
pub struct Step<T> {
    /// The rate tried.
    pub rate: f64,
    /// Whether the server sustained it.
    pub passed: bool,
    /// What the step measured.
    pub outcome: T,
}

/// Bounds of the search.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// First rate tried.
    pub start: f64,
    /// Doubling stops here (the step at this rate is the last one tried upward).
    pub max: f64,
    /// Halving stops below this.
    pub min: f64,
    /// Bisection stops when the failing rate is within `1 + precision` of the passing one.
    pub precision: f64,
    /// Most steps in all.
    pub max_steps: usize,
}

/// The search as a state machine, so that several servers' searches can be stepped in turn
/// (each step of one server run right after the same stage of the others, under the same
/// conditions of the machine): ask [`Search::next_rate`], run it, [`Search::record`] it.
#[derive(Debug, Clone)]
pub struct Search<T> {
    bounds: Bounds,
    lo: Option<f64>,
    hi: Option<f64>,
    next: Option<f64>,
    steps: Vec<Step<T>>,
}

impl<T> Search<T> {
    /// A search that starts at `bounds.start`.
    pub fn new(bounds: Bounds) -> Self {
        Search {
            bounds,
            lo: None,
            hi: None,
            next: Some(bounds.start.max(1.0)),
            steps: Vec::new(),
        }
    }

    /// The rate to try next, or `None` when the search is over.
    pub fn next_rate(&self) -> Option<f64> {
        self.next
    }

    /// Records the outcome of the step at [`Search::next_rate`] and chooses the next rate:
    /// doubling while steps pass and no step failed yet, halving while the first steps fail,
    /// then bisection between the highest pass and the lowest failure.
    pub fn record(&mut self, passed: bool, outcome: T) {
        let Some(rate) = self.next.take() else {
            return;
        };
        self.steps.push(Step {
            rate,
            passed,
            outcome,
        });
        if passed {
            self.lo = Some(self.lo.map_or(rate, |l| l.max(rate)));
        } else {
            self.hi = Some(self.hi.map_or(rate, |h| h.min(rate)));
        }
        if self.steps.len() >= self.bounds.max_steps {
            return;
        }
        self.next = match (self.lo, self.hi) {
            (Some(l), None) if l < self.bounds.max => Some((l * 2.0).min(self.bounds.max)),
            (Some(_), None) => None,
            (None, Some(h)) => Some(h / 2.0).filter(|r| *r >= self.bounds.min),
            (Some(l), Some(h)) if h > l * (1.0 + self.bounds.precision) => {
                Some(round_rate((l + h) / 2.0)).filter(|m| *m > l && *m < h)
            }
            _ => None,
        };
    }

    /// Ends the search (e.g. after an error).
    pub fn stop(&mut self) {
        self.next = None;
    }

    /// The steps so far, in the order run.
    pub fn steps(&self) -> &[Step<T>] {
        &self.steps
    }

    /// The steps, consumed.
    pub fn into_steps(self) -> Vec<Step<T>> {
        self.steps
    }
}

/// Runs a whole search; `run(rate)` returns whether the rate passed and what it measured. An
/// `Err` from `run` ends the search and is returned with the steps so far.
pub fn search<T, E>(
    bounds: Bounds,
    mut run: impl FnMut(f64) -> Result<(bool, T), E>,
) -> (Vec<Step<T>>, Option<E>) {
    let mut s = Search::new(bounds);
    while let Some(rate) = s.next_rate() {
        match run(rate) {
            Ok((passed, outcome)) => s.record(passed, outcome),
            Err(e) => return (s.into_steps(), Some(e)),
        }
    }
    (s.into_steps(), None)
}

/// The passing step with the highest rate.
pub fn best<T>(steps: &[Step<T>]) -> Option<&Step<T>> {
    steps
        .iter()
        .filter(|s| s.passed)
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
}

/// Rounds to two significant digits below 10,000 and to hundreds above, so the rates in a
/// report read as round numbers.
fn round_rate(r: f64) -> f64 {
    let step = if r >= 10_000.0 {
        100.0
    } else if r >= 1000.0 {
        50.0
    } else {
        10.0_f64.powf((r.max(1.0).log10().floor() - 1.0).max(0.0))
    };
    (r / step).round() * step
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            start: 1000.0,
            max: 512_000.0,
            min: 10.0,
            precision: 0.1,
            max_steps: 30,
        }
    }

    fn capacity(c: f64) -> impl FnMut(f64) -> Result<(bool, f64), ()> {
        move |r| Ok((r <= c, r))
    }

    #[test]
    fn doubles_then_bisects_to_within_the_precision() {
        let (steps, err) = search(bounds(), capacity(37_000.0));
        assert!(err.is_none());
        let rates: Vec<f64> = steps.iter().map(|s| s.rate).collect();
        assert_eq!(
            &rates[..7],
            &[1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 64000.0]
        );
        let b = best(&steps).unwrap();
        assert!(b.rate <= 37_000.0 && b.rate >= 37_000.0 / 1.1, "{rates:?}");
        let lowest_fail = steps
            .iter()
            .filter(|s| !s.passed)
            .map(|s| s.rate)
            .fold(f64::MAX, f64::min);
        assert!(lowest_fail <= b.rate * 1.1, "{rates:?}");
    }

    #[test]
    fn halves_when_the_start_fails_and_stops_at_the_ceiling() {
        let (steps, _) = search(bounds(), capacity(300.0));
        let b = best(&steps).unwrap();
        assert!(b.rate <= 300.0 && b.rate >= 300.0 / 1.1, "{steps:?}");
        assert_eq!(steps[0].rate, 1000.0);
        assert_eq!(steps[1].rate, 500.0);

        let (steps, _) = search(bounds(), capacity(1e9));
        assert_eq!(best(&steps).unwrap().rate, 512_000.0);
        assert!(steps.iter().all(|s| s.passed));

        let (steps, _) = search(bounds(), capacity(1.0));
        assert!(best(&steps).is_none());
        assert!(steps.last().unwrap().rate >= 10.0);
    }

    #[test]
    fn an_error_ends_the_search_with_the_steps_so_far() {
        let mut n = 0;
        let (steps, err) = search(bounds(), |r| {
            n += 1;
            if n == 3 { Err("boom") } else { Ok((true, r)) }
        });
        assert_eq!(err, Some("boom"));
        assert_eq!(steps.len(), 2);
    }

    #[test]
    fn rounds_rates() {
        assert_eq!(round_rate(48_123.0), 48_100.0);
        assert_eq!(round_rate(1234.0), 1250.0);
        assert_eq!(round_rate(357.0), 360.0);
        assert_eq!(round_rate(7.4), 7.0);
    }
}
