//! The node's recent past: a bounded in-memory series of its counters, sampled every
//! `admin.history_interval` (15 s) for the last 24 hours, behind `GET /stats/history`, the
//! dashboard's charts and MCC's `GET /summary`.
//!
//! Samples hold the counters as they were (totals since start), so a reader computes any rate
//! from two samples, and a missed sample costs resolution, never a wrong figure. The series is
//! capped at [`WINDOW`] divided by the interval; the oldest sample goes when a new one comes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use outpost_shared::sync::lock;
use serde::Serialize;

use crate::stats::StatsSnapshot;

/// How far back the series reaches.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);

/// One sample of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken, in seconds since the Unix epoch.
    pub unix: u64,
    /// Requests on the client listener so far.
    pub requests: u64,
    /// Requests answered all from disk.
    pub hit_requests: u64,
    /// Requests answered all from fills.
    pub miss_requests: u64,
    /// Requests relayed uncached.
    pub pass_through_requests: u64,
    /// Body bytes sent from disk.
    pub hit_bytes: u64,
    /// Body bytes sent from fills.
    pub miss_bytes: u64,
    /// Every body byte sent to clients.
    pub egress_bytes: u64,
    /// Body bytes received from origins.
    pub origin_bytes: u64,
    /// Bytes stored (a gauge).
    pub cache_used_bytes: u64,
    /// The drives' sizes together (a gauge).
    pub cache_max_bytes: u64,
    /// Objects stored (a gauge).
    pub objects: u64,
    /// Fills talking to origins (a gauge).
    pub fills_in_flight: u64,
    /// Client connections open (a gauge).
    pub connections_open: u64,
}

impl Sample {
    /// The sample of `snapshot`, taken at `unix`.
    pub fn of(snapshot: &StatsSnapshot, unix: u64) -> Sample {
        Sample {
            unix,
            requests: snapshot.requests,
            hit_requests: snapshot.hit_requests,
            miss_requests: snapshot.miss_requests,
            pass_through_requests: snapshot.pass_through_requests,
            hit_bytes: snapshot.hit_bytes,
            miss_bytes: snapshot.miss_bytes,
            egress_bytes: snapshot.egress_bytes,
            origin_bytes: snapshot.origin_bytes,
            cache_used_bytes: snapshot.cache_used_bytes,
            cache_max_bytes: snapshot.cache_max_bytes,
            objects: snapshot.objects,
            fills_in_flight: snapshot.fills_in_flight,
            connections_open: snapshot.edge.connections_open,
        }
    }
}

/// The bounded series.
#[derive(Debug)]
pub struct History {
    interval: Duration,
    capacity: usize,
    samples: Mutex<VecDeque<Sample>>,
}

/// What `GET /stats/history` answers.
#[derive(Debug, Serialize)]
pub struct HistoryView {
    /// Seconds between samples.
    pub interval_secs: f64,
    /// The most samples kept.
    pub capacity: usize,
    /// Samples, oldest first.
    pub samples: Vec<Sample>,
}

/// MCC's summary figures over one span.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryFigures {
    /// Body bytes sent from disk.
    pub hit_bytes: u64,
    /// Body bytes sent from fills.
    pub miss_bytes: u64,
    /// Every body byte sent to clients.
    pub egress_bytes: u64,
    /// `hitBytes / (hitBytes + missBytes)`, 0 without traffic.
    pub hit_ratio_bytes: f64,
}

impl SummaryFigures {
    fn between(earlier: Option<&Sample>, later: &Sample) -> SummaryFigures {
        let base = |value: fn(&Sample) -> u64| earlier.map_or(0, value);
        let hit_bytes = later.hit_bytes.saturating_sub(base(|s| s.hit_bytes));
        let miss_bytes = later.miss_bytes.saturating_sub(base(|s| s.miss_bytes));
        SummaryFigures {
            hit_bytes,
            miss_bytes,
            egress_bytes: later.egress_bytes.saturating_sub(base(|s| s.egress_bytes)),
            hit_ratio_bytes: ratio(hit_bytes, miss_bytes),
        }
    }
}

fn ratio(hit: u64, miss: u64) -> f64 {
    if hit + miss == 0 {
        0.0
    } else {
        hit as f64 / (hit + miss) as f64
    }
}

/// What `GET /summary` answers: MCC's local summary. The top-level figures are over the last
/// interval (between the two newest samples), as MCC's were every 15 s; `sinceStart` over the
/// node's whole run, equal to `/stats`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The last interval's figures.
    #[serde(flatten)]
    pub last_interval: SummaryFigures,
    /// Seconds the last interval covers.
    pub interval_secs: u64,
    /// When the last interval ended, in seconds since the Unix epoch.
    pub end_unix: u64,
    /// The figures since the node started.
    pub since_start: SummaryFigures,
}

impl History {
    /// An empty series sampled every `interval`.
    pub fn new(interval: Duration) -> History {
        let interval = interval.max(Duration::from_secs(1));
        let capacity = (WINDOW.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
        History {
            interval,
            capacity,
            samples: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
        }
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Adds a sample, dropping the oldest beyond the capacity.
    pub fn record(&self, sample: Sample) {
        let mut samples = lock(&self.samples);
        if samples.len() == self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The samples taken after `since` (seconds since the Unix epoch; 0 for all).
    pub fn view(&self, since: u64) -> HistoryView {
        let samples = lock(&self.samples)
            .iter()
            .filter(|sample| sample.unix > since)
            .copied()
            .collect();
        HistoryView {
            interval_secs: self.interval.as_secs_f64(),
            capacity: self.capacity,
            samples,
        }
    }

    /// MCC's summary, with `now` (a sample of the counters as they are) for `sinceStart`.
    pub fn summary(&self, now: &Sample) -> Summary {
        let samples = lock(&self.samples);
        let newest = samples.back().copied().unwrap_or(*now);
        let before = samples.len().checked_sub(2).and_then(|at| samples.get(at));
        Summary {
            last_interval: SummaryFigures::between(before, &newest),
            interval_secs: before.map_or(0, |earlier| newest.unix.saturating_sub(earlier.unix)),
            end_unix: newest.unix,
            since_start: SummaryFigures::between(None, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(unix: u64, hit_bytes: u64, miss_bytes: u64) -> Sample {
        Sample {
            unix,
            requests: 0,
            hit_requests: 0,
            miss_requests: 0,
            pass_through_requests: 0,
            hit_bytes,
            miss_bytes,
            egress_bytes: hit_bytes + miss_bytes,
            origin_bytes: miss_bytes,
            cache_used_bytes: 0,
            cache_max_bytes: 0,
            objects: 0,
            fills_in_flight: 0,
            connections_open: 0,
        }
    }

    #[test]
    fn the_series_is_bounded_to_a_day_of_samples() {
        let history = History::new(Duration::from_secs(15));
        assert_eq!(history.capacity, 5760);
        let small = History::new(Duration::from_secs(8 * 3600));
        for unix in 1..=5 {
            small.record(sample(unix, 0, 0));
        }
        let view = small.view(0);
        assert_eq!(view.capacity, 3);
        let kept: Vec<u64> = view.samples.iter().map(|s| s.unix).collect();
        assert_eq!(kept, [3, 4, 5]);
        let newer: Vec<u64> = small.view(4).samples.iter().map(|s| s.unix).collect();
        assert_eq!(newer, [5]);
    }

    #[test]
    fn the_summary_is_the_last_interval_and_the_whole_run() {
        let history = History::new(Duration::from_secs(15));
        history.record(sample(100, 10, 10));
        history.record(sample(115, 40, 20));
        let now = sample(120, 50, 30);
        let summary = history.summary(&now);
        assert_eq!(summary.last_interval.hit_bytes, 30);
        assert_eq!(summary.last_interval.miss_bytes, 10);
        assert_eq!(summary.last_interval.egress_bytes, 40);
        assert!((summary.last_interval.hit_ratio_bytes - 0.75).abs() < 1e-9);
        assert_eq!(summary.interval_secs, 15);
        assert_eq!(summary.end_unix, 115);
        assert_eq!(summary.since_start.hit_bytes, 50);
        assert_eq!(summary.since_start.egress_bytes, 80);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["hitBytes"], 30);
        assert_eq!(json["sinceStart"]["missBytes"], 30);
        assert_eq!(json["hitRatioBytes"], 0.75);
        // Before two samples exist, the interval is the run so far.
        let fresh = History::new(Duration::from_secs(15));
        let early = fresh.summary(&now);
        assert_eq!(early.last_interval, early.since_start);
    }
}
