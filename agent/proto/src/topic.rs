//! Topic names, in one place. Everything lives under `fedge/v1/{fleet}/`:
//!
//! | topic | kind | retained | publisher |
//! |---|---|---|---|
//! | `dev/{device}/status` | `Status` | yes (and the last will) | device |
//! | `dev/{device}/telemetry` | `Telemetry` | no | device |
//! | `dev/{device}/cmd` | `Command`, `Ack`, `SecAgg` | no | operator, aggregator |
//! | `dev/{device}/desired` | `Command::Install` (the desired model) | yes | operator |
//! | `job/{job}/round` | `RoundAnnounce` | yes | aggregator |
//! | `job/{job}/model/{version}/{chunk}` | `Chunk` of the global model | yes | aggregator |
//! | `job/{job}/update/{device}` | `Update`, `SecAgg` | no | device |
//! | `bundle/{sha256}/{chunk}` | `Chunk` of a signed model bundle | yes | operator |
//! | `aggregator` | `Certificate` of the aggregator key, signed by the operator | yes | aggregator |
//!
//! Aggregator workers that share a job subscribe to [`shared_updates`]
//! (`$share/{group}/fedge/v1/{fleet}/job/{job}/update/+`).

use core::fmt::Write;

use crate::{Kind, ProtoError, check_id};

/// The first two levels of every topic.
pub const ROOT: &str = "fedge/v1";

/// A topic name or filter. 256 bytes holds the longest one with 64-byte ids.
pub type TopicBuf = heapless::String<256>;

fn build(args: core::fmt::Arguments<'_>) -> Result<TopicBuf, ProtoError> {
    let mut s = TopicBuf::new();
    s.write_fmt(args).map_err(|_| ProtoError::BufferFull)?;
    Ok(s)
}

fn ids(list: &[&str]) -> Result<(), ProtoError> {
    list.iter().try_for_each(|i| check_id(i))
}

/// `fedge/v1/{fleet}/dev/{device}/status` (retained; the device's last will goes here too).
pub fn dev_status(fleet: &str, device: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, device])?;
    build(format_args!("{ROOT}/{fleet}/dev/{device}/status"))
}

/// `fedge/v1/{fleet}/dev/{device}/telemetry`.
pub fn dev_telemetry(fleet: &str, device: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, device])?;
    build(format_args!("{ROOT}/{fleet}/dev/{device}/telemetry"))
}

/// `fedge/v1/{fleet}/dev/{device}/cmd`: operator commands and aggregator acks to one device.
pub fn dev_cmd(fleet: &str, device: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, device])?;
    build(format_args!("{ROOT}/{fleet}/dev/{device}/cmd"))
}

/// `fedge/v1/{fleet}/dev/{device}/desired` (retained): the model the operator wants the device to
/// run, as a signed `Command::Install`. A device that was offline finds it when it connects.
pub fn dev_desired(fleet: &str, device: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, device])?;
    build(format_args!("{ROOT}/{fleet}/dev/{device}/desired"))
}

/// `fedge/v1/{fleet}/dev/+/{leaf}`: one leaf (`status`, `telemetry`) of every device.
pub fn all_devices(fleet: &str, leaf: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, leaf])?;
    build(format_args!("{ROOT}/{fleet}/dev/+/{leaf}"))
}

/// `fedge/v1/{fleet}/job/{job}/round` (retained announcement of the current round).
pub fn job_round(fleet: &str, job: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, job])?;
    build(format_args!("{ROOT}/{fleet}/job/{job}/round"))
}

/// `fedge/v1/{fleet}/job/+/round`: every job's announcement.
pub fn all_rounds(fleet: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet])?;
    build(format_args!("{ROOT}/{fleet}/job/+/round"))
}

/// `fedge/v1/{fleet}/job/{job}/model/{version}/{index}` (retained chunk of the global model).
pub fn job_model_chunk(
    fleet: &str,
    job: &str,
    version: u64,
    index: u32,
) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, job])?;
    build(format_args!(
        "{ROOT}/{fleet}/job/{job}/model/{version}/{index}"
    ))
}

/// `fedge/v1/{fleet}/job/{job}/update/{device}`.
pub fn job_update(fleet: &str, job: &str, device: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, job, device])?;
    build(format_args!("{ROOT}/{fleet}/job/{job}/update/{device}"))
}

/// `fedge/v1/{fleet}/job/{job}/update/+`: every device's updates for one job.
pub fn job_updates(fleet: &str, job: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet, job])?;
    build(format_args!("{ROOT}/{fleet}/job/{job}/update/+"))
}

/// `$share/{group}/fedge/v1/{fleet}/job/{job}/update/+`: the same, load-balanced over the
/// aggregator workers of `group` by a broker with shared subscriptions (MQTT 5, and EMQX, HiveMQ,
/// VerneMQ, Mosquitto 2 on 3.1.1 too).
pub fn shared_updates(group: &str, fleet: &str, job: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[group, fleet, job])?;
    build(format_args!(
        "$share/{group}/{ROOT}/{fleet}/job/{job}/update/+"
    ))
}

/// `fedge/v1/{fleet}/aggregator` (retained): the operator's certificate of the aggregator key.
pub fn aggregator(fleet: &str) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet])?;
    build(format_args!("{ROOT}/{fleet}/aggregator"))
}

/// `fedge/v1/{fleet}/bundle/{sha256-hex}/{index}` (retained chunk of a signed bundle).
pub fn bundle_chunk(fleet: &str, sha256: &[u8; 32], index: u32) -> Result<TopicBuf, ProtoError> {
    ids(&[fleet])?;
    build(format_args!(
        "{ROOT}/{fleet}/bundle/{}/{index}",
        crate::hex::encode32(sha256)
    ))
}

/// A parsed topic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    DevStatus {
        fleet: &'a str,
        device: &'a str,
    },
    DevTelemetry {
        fleet: &'a str,
        device: &'a str,
    },
    DevCmd {
        fleet: &'a str,
        device: &'a str,
    },
    DevDesired {
        fleet: &'a str,
        device: &'a str,
    },
    JobRound {
        fleet: &'a str,
        job: &'a str,
    },
    JobModelChunk {
        fleet: &'a str,
        job: &'a str,
        version: u64,
        index: u32,
    },
    JobUpdate {
        fleet: &'a str,
        job: &'a str,
        device: &'a str,
    },
    BundleChunk {
        fleet: &'a str,
        sha256: [u8; 32],
        index: u32,
    },
    Aggregator {
        fleet: &'a str,
    },
}

impl<'a> Topic<'a> {
    /// Parses a topic name (not a filter). Unknown or malformed names give `None`.
    pub fn parse(name: &'a str) -> Option<Self> {
        let rest = name.strip_prefix(ROOT)?.strip_prefix('/')?;
        let mut it = rest.split('/');
        let mut level = || it.next().filter(|l| check_id(l).is_ok());
        let fleet = level()?;
        let t = match level()? {
            "dev" => {
                let device = level()?;
                match level()? {
                    "status" => Self::DevStatus { fleet, device },
                    "telemetry" => Self::DevTelemetry { fleet, device },
                    "cmd" => Self::DevCmd { fleet, device },
                    "desired" => Self::DevDesired { fleet, device },
                    _ => return None,
                }
            }
            "job" => {
                let job = level()?;
                match level()? {
                    "round" => Self::JobRound { fleet, job },
                    "model" => {
                        let version = level()?.parse().ok()?;
                        let index = level()?.parse().ok()?;
                        Self::JobModelChunk {
                            fleet,
                            job,
                            version,
                            index,
                        }
                    }
                    "update" => Self::JobUpdate {
                        fleet,
                        job,
                        device: level()?,
                    },
                    _ => return None,
                }
            }
            "aggregator" => Self::Aggregator { fleet },
            "bundle" => {
                let sha256 = crate::hex::decode::<32>(level()?).ok()?;
                let index = level()?.parse().ok()?;
                Self::BundleChunk {
                    fleet,
                    sha256,
                    index,
                }
            }
            _ => return None,
        };
        if it.next().is_some() { None } else { Some(t) }
    }

    /// The envelope kinds a receiver accepts on this topic.
    pub fn accepts(&self, kind: Kind) -> bool {
        match self {
            Self::DevStatus { .. } => kind == Kind::Status,
            Self::DevTelemetry { .. } => kind == Kind::Telemetry,
            Self::DevCmd { .. } => matches!(kind, Kind::Command | Kind::Ack | Kind::SecAgg),
            Self::DevDesired { .. } => kind == Kind::Command,
            Self::JobRound { .. } => kind == Kind::RoundAnnounce,
            Self::JobModelChunk { .. } | Self::BundleChunk { .. } => kind == Kind::Chunk,
            Self::JobUpdate { .. } => matches!(kind, Kind::Update | Kind::SecAgg),
            Self::Aggregator { .. } => kind == Kind::Certificate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse() {
        let t = job_model_chunk("f1", "digits", 3, 7).expect("topic");
        assert_eq!(t.as_str(), "fedge/v1/f1/job/digits/model/3/7");
        assert_eq!(
            Topic::parse(&t),
            Some(Topic::JobModelChunk {
                fleet: "f1",
                job: "digits",
                version: 3,
                index: 7
            })
        );
        let s = dev_status("f1", "d-9").expect("topic");
        assert_eq!(
            Topic::parse(&s),
            Some(Topic::DevStatus {
                fleet: "f1",
                device: "d-9"
            })
        );
        let d = dev_desired("f1", "d-9").expect("topic");
        assert_eq!(d.as_str(), "fedge/v1/f1/dev/d-9/desired");
        let parsed = Topic::parse(&d).expect("parse");
        assert!(parsed.accepts(Kind::Command) && !parsed.accepts(Kind::Ack));
        let b = bundle_chunk("f1", &[0x11; 32], 0).expect("topic");
        assert_eq!(
            Topic::parse(&b),
            Some(Topic::BundleChunk {
                fleet: "f1",
                sha256: [0x11; 32],
                index: 0
            })
        );
        let a = aggregator("f1").expect("topic");
        assert_eq!(a.as_str(), "fedge/v1/f1/aggregator");
        let parsed = Topic::parse(&a).expect("parse");
        assert_eq!(parsed, Topic::Aggregator { fleet: "f1" });
        assert!(parsed.accepts(Kind::Certificate) && !parsed.accepts(Kind::RoundAnnounce));
        assert_eq!(
            shared_updates("agg", "f1", "j").expect("topic").as_str(),
            "$share/agg/fedge/v1/f1/job/j/update/+"
        );
        assert!(
            Topic::parse(&job_update("f1", "j", "d").expect("topic"))
                .expect("parse")
                .accepts(Kind::Update)
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(dev_status("f1", "a/b"), Err(ProtoError::BadId));
        assert_eq!(job_round("", "j"), Err(ProtoError::BadId));
        for bad in [
            "fedge/v2/f/dev/d/status",
            "fedge/v1/f/dev/d/status/extra",
            "fedge/v1/f/dev/+/status",
            "fedge/v1/f/job/j/model/x/1",
            "fedge/v1/f/bundle/abc/1",
            "fedge/v1//dev/d/status",
        ] {
            assert_eq!(Topic::parse(bad), None, "{bad}");
        }
    }
}
