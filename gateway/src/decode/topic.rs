//! Topic layout: which segments of an MQTT topic name the device and the measurement.
//!
//! Like Telegraf's `topic_parsing`: a pattern of `/`-separated segments, each a literal, `+`
//! (any one segment) or one of the placeholders `{device}` and `{measurement}`.

use super::DecodeError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
    Device,
    Measurement,
}

/// A parsed topic pattern, e.g. `telemetry/{device}/{measurement}`.
#[derive(Debug, Clone)]
pub struct TopicPattern {
    segments: Vec<Segment>,
}

/// Why a pattern is unusable; the config layer turns this into a message naming the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("must contain {{device}} exactly once")]
    Device,
    #[error("must contain {{measurement}} exactly once")]
    Measurement,
    #[error("segment {0:?} is neither a literal, `+`, {{device}} nor {{measurement}}")]
    Segment(String),
}

/// The most bytes a device or measurement name may have (docs/contract.md §1).
pub const MAX_NAME_LEN: usize = 64;

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let segments: Vec<Segment> = pattern
            .split('/')
            .map(|s| match s {
                "{device}" => Ok(Segment::Device),
                "{measurement}" => Ok(Segment::Measurement),
                "+" => Ok(Segment::Any),
                s if s.is_empty() || s.contains(['{', '}', '#', '+']) => {
                    Err(PatternError::Segment(s.to_owned()))
                }
                s => Ok(Segment::Literal(s.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        if segments.iter().filter(|s| **s == Segment::Device).count() != 1 {
            return Err(PatternError::Device);
        }
        if segments
            .iter()
            .filter(|s| **s == Segment::Measurement)
            .count()
            != 1
        {
            return Err(PatternError::Measurement);
        }
        Ok(Self { segments })
    }

    /// The MQTT subscription filter that matches exactly the topics of this pattern.
    pub fn filter(&self) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                _ => "+",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Whether every topic that `filter` can match belongs to `device`: its {device} level is
    /// that device's name, with no `#` before it. `$` topics (shared subscriptions, broker
    /// internals) never are.
    pub fn filter_within(&self, filter: &str, device: &str) -> bool {
        let Some(index) = self.segments.iter().position(|s| *s == Segment::Device) else {
            return false;
        };
        let levels: Vec<&str> = filter.split('/').collect();
        !filter.starts_with('$')
            && levels.get(index) == Some(&device)
            && !levels[..index].contains(&"#")
    }

    /// Whether `topic` is telemetry for the gateway to decode: it has the pattern's levels
    /// with its literals, or it starts with the pattern's first level when that is a literal
    /// (`telemetry/…`), so that a malformed telemetry topic is refused with a reason rather
    /// than passed to the broker. Everything else is for the broker's subscribers.
    pub fn claims(&self, topic: &str) -> bool {
        if let Some(Segment::Literal(first)) = self.segments.first() {
            return topic.split('/').next() == Some(first.as_str());
        }
        let levels: Vec<&str> = topic.split('/').collect();
        levels.len() == self.segments.len()
            && self.segments.iter().zip(&levels).all(|(s, l)| match s {
                Segment::Literal(lit) => lit == l,
                _ => true,
            })
    }

    /// The device a topic names, if it fits the pattern.
    pub fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        self.match_topic(topic).ok().map(|(device, _)| device)
    }

    /// Splits `topic` into `(device, measurement)`, or says why it does not fit.
    pub fn match_topic<'t>(&self, topic: &'t str) -> Result<(&'t str, &'t str), DecodeError> {
        let mut device = "";
        let mut measurement = "";
        let mut parts = topic.split('/');
        for segment in &self.segments {
            let part = parts
                .next()
                .ok_or_else(|| bad_topic(topic, "has too few levels"))?;
            match segment {
                Segment::Literal(l) if l != part => {
                    return Err(bad_topic(topic, "does not match the configured pattern"))
                }
                Segment::Literal(_) | Segment::Any => {}
                Segment::Device => device = part,
                Segment::Measurement => measurement = part,
            }
        }
        if parts.next().is_some() {
            return Err(bad_topic(topic, "has too many levels"));
        }
        check_name(topic, "device", device)?;
        check_name(topic, "measurement", measurement)?;
        Ok((device, measurement))
    }
}

fn check_name(topic: &str, what: &str, name: &str) -> Result<(), DecodeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(bad_topic(
            topic,
            &format!("has a {what} that is not 1-{MAX_NAME_LEN} characters of [A-Za-z0-9_.-]"),
        ))
    }
}

fn bad_topic(topic: &str, why: &str) -> DecodeError {
    // Topics are attacker-controlled: keep what goes into logs short.
    let shown: String = topic.chars().take(128).collect();
    DecodeError::BadTopic(format!("topic {shown:?} {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pattern() {
        let p = TopicPattern::parse("telemetry/{device}/{measurement}").expect("valid");
        assert_eq!(p.filter(), "telemetry/+/+");
        assert_eq!(
            p.match_topic("telemetry/dev-1/temp").expect("fits"),
            ("dev-1", "temp")
        );
        for bad in [
            "telemetry/dev-1",
            "telemetry/dev-1/temp/extra",
            "other/dev-1/temp",
            "telemetry//temp",
            "telemetry/dev 1/temp",
            "telemetry/dev,1/temp",
            "telemetry/d\u{e9}v/temp",
            &format!("telemetry/{}/temp", "d".repeat(65)),
        ] {
            assert!(
                matches!(p.match_topic(bad), Err(DecodeError::BadTopic(_))),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn custom_patterns() {
        let p = TopicPattern::parse("site/+/{measurement}/{device}").expect("valid");
        assert_eq!(p.filter(), "site/+/+/+");
        assert_eq!(
            p.match_topic("site/north/temp/d1").expect("fits"),
            ("d1", "temp")
        );
        assert_eq!(
            TopicPattern::parse("a/{device}").err(),
            Some(PatternError::Measurement)
        );
        assert_eq!(
            TopicPattern::parse("{device}/{device}/{measurement}").err(),
            Some(PatternError::Device)
        );
        assert!(matches!(
            TopicPattern::parse("a/#/{device}/{measurement}"),
            Err(PatternError::Segment(_))
        ));
    }
}
