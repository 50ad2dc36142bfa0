//! Counters and histograms of the running service, rendered in the Prometheus text format
//! (version 0.0.4) by hand. They count since the process started, as Prometheus expects;
//! what must survive a restart lives in the store.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use fedge_proto::msg::Reason;
use serde::Serialize;

/// Upper bounds (seconds) of the histogram buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0,
];

/// A cumulative histogram of durations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (c, le) in self.counts.iter_mut().zip(BUCKETS) {
            if seconds <= le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str) {
        for (c, le) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// A snapshot of every counter.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Accepted updates per job.
    pub accepted: BTreeMap<String, u64>,
    /// Refusals by reason (retransmissions of accepted updates count as `duplicate`).
    pub rejected: BTreeMap<&'static str, u64>,
    /// Envelope bytes received on update topics.
    pub update_bytes: u64,
    /// Bytes published (announcements, model chunks, acks).
    pub published_bytes: u64,
    /// Rounds aggregated per job.
    pub rounds_completed: BTreeMap<String, u64>,
    pub aggregation_seconds: Histogram,
    pub round_seconds: Histogram,
    pub commit_seconds: Histogram,
}

/// The live counters, shared by the engine (writer) and the HTTP handlers (readers).
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Snapshot>,
}

impl Stats {
    fn with(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g);
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn accepted(&self, job: &str) {
        self.with(|s| *s.accepted.entry(job.into()).or_default() += 1);
    }

    pub fn rejected(&self, reason: Reason) {
        self.with(|s| *s.rejected.entry(reason.as_str()).or_default() += 1);
    }

    pub fn received(&self, bytes: usize) {
        self.with(|s| s.update_bytes += bytes as u64);
    }

    pub fn published(&self, bytes: usize) {
        self.with(|s| s.published_bytes += bytes as u64);
    }

    pub fn committed(&self, seconds: f64) {
        self.with(|s| s.commit_seconds.observe(seconds));
    }

    pub fn round_completed(&self, job: &str, aggregation_s: f64, round_s: f64) {
        self.with(|s| {
            *s.rounds_completed.entry(job.into()).or_default() += 1;
            s.aggregation_seconds.observe(aggregation_s);
            s.round_seconds.observe(round_s);
        });
    }
}

/// Gauges read from the store at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// (job, current round, model version, finished)
    pub jobs: Vec<(String, u64, u64, bool)>,
    pub devices_registered: u64,
    pub devices_revoked: u64,
    pub devices_seen: u64,
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The Prometheus text exposition of `s` and `g`.
pub fn render(s: &Snapshot, g: &Gauges) -> String {
    let mut out = String::new();
    let p = "fedge_aggregator";
    header(
        &mut out,
        &format!("{p}_updates_accepted_total"),
        "counter",
        "Updates durably accepted, per job.",
    );
    for (job, n) in &s.accepted {
        let _ = writeln!(out, "{p}_updates_accepted_total{{job=\"{job}\"}} {n}");
    }
    header(
        &mut out,
        &format!("{p}_updates_rejected_total"),
        "counter",
        "Updates refused, by reason.",
    );
    for r in Reason::ALL {
        let n = s.rejected.get(r.as_str()).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{p}_updates_rejected_total{{reason=\"{}\"}} {n}",
            r.as_str()
        );
    }
    header(
        &mut out,
        &format!("{p}_update_bytes_total"),
        "counter",
        "Envelope bytes received on update topics.",
    );
    let _ = writeln!(out, "{p}_update_bytes_total {}", s.update_bytes);
    header(
        &mut out,
        &format!("{p}_published_bytes_total"),
        "counter",
        "Payload bytes published.",
    );
    let _ = writeln!(out, "{p}_published_bytes_total {}", s.published_bytes);
    header(
        &mut out,
        &format!("{p}_rounds_completed_total"),
        "counter",
        "Rounds aggregated since start, per job.",
    );
    for (job, n) in &s.rounds_completed {
        let _ = writeln!(out, "{p}_rounds_completed_total{{job=\"{job}\"}} {n}");
    }
    header(
        &mut out,
        &format!("{p}_round"),
        "gauge",
        "The open (or, once finished, last) round, per job.",
    );
    for (job, round, _, _) in &g.jobs {
        let _ = writeln!(out, "{p}_round{{job=\"{job}\"}} {round}");
    }
    header(
        &mut out,
        &format!("{p}_model_version"),
        "gauge",
        "The latest global model version, per job.",
    );
    for (job, _, version, _) in &g.jobs {
        let _ = writeln!(out, "{p}_model_version{{job=\"{job}\"}} {version}");
    }
    header(
        &mut out,
        &format!("{p}_job_finished"),
        "gauge",
        "1 once a job has run all its rounds.",
    );
    for (job, _, _, finished) in &g.jobs {
        let _ = writeln!(
            out,
            "{p}_job_finished{{job=\"{job}\"}} {}",
            u8::from(*finished)
        );
    }
    for (name, v, help) in [
        (
            "devices_registered",
            g.devices_registered,
            "Devices in the registry.",
        ),
        ("devices_revoked", g.devices_revoked, "Revoked devices."),
        (
            "devices_seen",
            g.devices_seen,
            "Devices with at least one verified message.",
        ),
    ] {
        header(&mut out, &format!("{p}_{name}"), "gauge", help);
        let _ = writeln!(out, "{p}_{name} {v}");
    }
    for (name, h, help) in [
        (
            "aggregation_seconds",
            &s.aggregation_seconds,
            "Time the strategy took to aggregate a round.",
        ),
        (
            "round_duration_seconds",
            &s.round_seconds,
            "Time from a round's opening to its aggregation.",
        ),
        (
            "commit_seconds",
            &s.commit_seconds,
            "Time of each durable store commit.",
        ),
    ] {
        header(&mut out, &format!("{p}_{name}"), "histogram", help);
        h.render(&mut out, &format!("{p}_{name}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_reason_and_cumulative_buckets() {
        let stats = Stats::default();
        stats.rejected(Reason::Replay);
        stats.rejected(Reason::Replay);
        stats.accepted("digits");
        stats.round_completed("digits", 0.003, 0.2);
        let text = render(&stats.snapshot(), &Gauges::default());
        assert!(
            text.contains("fedge_aggregator_updates_rejected_total{reason=\"replay\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("fedge_aggregator_updates_rejected_total{reason=\"late\"} 0\n"));
        assert!(text.contains("fedge_aggregator_updates_accepted_total{job=\"digits\"} 1\n"));
        assert!(text.contains("fedge_aggregator_aggregation_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("fedge_aggregator_aggregation_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("fedge_aggregator_aggregation_seconds_count 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split(' ').count(), 2, "{line}");
        }
    }
}
