//! Decode: MQTT payload → line protocol (docs/contract.md §1 and §2).
//!
//! A payload is CBOR or JSON, one reading or an array of readings. Both formats drive the same
//! [`ReadingBuilder`], which holds one reading in a reusable text arena, applies every rule, and
//! encodes the reading straight into the caller's line buffer. A reading that breaks a rule is
//! rejected alone; a payload that cannot be read at all is rejected whole.

mod cbor;
mod json;
pub mod topic;

use crate::events::Rejection;
use std::ops::Range;

use crate::line_protocol::{self, FieldValue};
pub use topic::TopicPattern;

/// Why a payload or a reading was refused. The caller's duty is the same for every variant
/// (count it under [`DecodeError::reason`], log it, move on to the next message), so they are
/// grouped by what was refused: the whole payload first, then a single reading.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DecodeError {
    // ---- the whole payload is refused ----
    #[error("payload of {size} bytes exceeds decode.max_payload_bytes ({max})")]
    PayloadTooLarge { size: usize, max: usize },
    #[error("empty payload")]
    EmptyPayload,
    #[error("content type {0:?} is neither application/cbor nor application/json")]
    UnsupportedContentType(String),
    #[error("{0}")]
    BadTopic(String),
    #[error("payload ends early: {0}")]
    Truncated(String),
    #[error("malformed CBOR: {0}")]
    MalformedCbor(String),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("{0} bytes after the end of the payload's data item")]
    TrailingBytes(usize),
    #[error("payload nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("payload holds {count} readings, more than decode.max_readings_per_payload ({max})")]
    TooManyReadings { count: usize, max: usize },

    // ---- one reading is refused, the others of its payload go on ----
    #[error("a reading must be a map, found {0}")]
    NotAMap(&'static str),
    #[error("reading has no `fields`")]
    MissingFields,
    #[error("`fields` is empty")]
    EmptyFields,
    #[error("`fields` must be a map, found {0}")]
    BadFields(&'static str),
    #[error("`tags` must be a map, found {0}")]
    BadTags(&'static str),
    #[error("reading has {count} fields, more than decode.max_fields_per_reading ({max})")]
    TooManyFields { count: usize, max: usize },
    #[error("unknown key {0:?} in a reading (expected fields, tags, ts)")]
    UnknownKey(String),
    #[error("a map key must be text, found {0}")]
    BadKey(&'static str),
    #[error("empty key")]
    EmptyKey,
    #[error("key of {len} bytes exceeds decode.max_key_bytes ({max})")]
    KeyTooLong { len: usize, max: usize },
    #[error("key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("text of {len} bytes exceeds decode.max_text_bytes ({max})")]
    TextTooLong { len: usize, max: usize },
    #[error("control character in a key or tag value, or a line break in text (line protocol cannot carry them)")]
    ControlCharacter,
    #[error("a backslash at the end of a key or tag value, or before a comma, equals sign, space or backslash, has no line-protocol spelling that every InfluxDB reads back")]
    UnencodableBackslash,
    #[error("tag {0:?} has an empty value")]
    EmptyTagValue(String),
    #[error("value of {0:?} is nested (a map or array); fields and tags hold scalars only")]
    NestedValue(String),
    #[error("value of {key:?} is {found}; expected a number, bool or text")]
    BadValue { key: String, found: &'static str },
    #[error("value of {0:?} is NaN or infinite")]
    NonFinite(String),
    #[error("integer value of {0:?} does not fit in 64 bits")]
    IntegerOutOfRange(String),
    #[error("bad timestamp: {0}")]
    BadTimestamp(String),
    #[error("timestamp is older than decode.max_age")]
    TimestampTooOld,
    #[error("timestamp is further in the future than decode.max_future_skew")]
    TimestampInFuture,
}

impl DecodeError {
    /// The `reason` label of `gateway_readings_rejected_total`.
    pub fn reason(&self) -> Rejection {
        use DecodeError::*;
        use Rejection as R;
        match self {
            PayloadTooLarge { .. } => R::PayloadTooLarge,
            EmptyPayload => R::EmptyPayload,
            UnsupportedContentType(_) => R::UnsupportedContentType,
            BadTopic(_) => R::BadTopic,
            Truncated(_) => R::Truncated,
            MalformedCbor(_) => R::MalformedCbor,
            MalformedJson(_) => R::MalformedJson,
            TrailingBytes(_) => R::TrailingBytes,
            TooDeep(_) => R::TooDeep,
            TooManyReadings { .. } => R::TooManyReadings,
            NotAMap(_) => R::NotAMap,
            MissingFields => R::MissingFields,
            EmptyFields => R::EmptyFields,
            BadFields(_) => R::BadFields,
            BadTags(_) => R::BadTags,
            TooManyFields { .. } => R::TooManyFields,
            UnknownKey(_) => R::UnknownKey,
            BadKey(_) => R::BadKey,
            EmptyKey => R::EmptyKey,
            KeyTooLong { .. } => R::KeyTooLong,
            DuplicateKey(_) => R::DuplicateKey,
            TextTooLong { .. } => R::TextTooLong,
            ControlCharacter => R::ControlCharacter,
            UnencodableBackslash => R::UnencodableBackslash,
            EmptyTagValue(_) => R::EmptyTagValue,
            NestedValue(_) => R::NestedValue,
            BadValue { .. } => R::BadValue,
            NonFinite(_) => R::NonFinite,
            IntegerOutOfRange(_) => R::IntegerOutOfRange,
            BadTimestamp(_) => R::BadTimestamp,
            TimestampTooOld => R::TimestampTooOld,
            TimestampInFuture => R::TimestampInFuture,
        }
    }
}

/// Units for integer timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestampUnit {
    S,
    Ms,
    Us,
    Ns,
}

impl TimestampUnit {
    fn nanos(self) -> i128 {
        match self {
            TimestampUnit::S => 1_000_000_000,
            TimestampUnit::Ms => 1_000_000,
            TimestampUnit::Us => 1_000,
            TimestampUnit::Ns => 1,
        }
    }
}

/// The rules a payload is held to; built from `[decode]` in the config.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_readings_per_payload: usize,
    pub max_fields_per_reading: usize,
    pub max_key_bytes: usize,
    pub max_text_bytes: usize,
    pub timestamp_unit: TimestampUnit,
    /// Nanoseconds; 0 turns the check off.
    pub max_age_ns: i64,
    /// Nanoseconds; 0 turns the check off.
    pub max_future_skew_ns: i64,
    pub keep_integers: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 256 * 1024,
            max_readings_per_payload: 10_000,
            max_fields_per_reading: 256,
            max_key_bytes: 128,
            max_text_bytes: 64 * 1024,
            timestamp_unit: TimestampUnit::Ms,
            max_age_ns: 30 * 24 * 3600 * 1_000_000_000,
            max_future_skew_ns: 10 * 60 * 1_000_000_000,
            keep_integers: false,
        }
    }
}

/// Nesting deeper than this is refused before recursion can hurt.
pub const MAX_DEPTH: usize = 32;

/// What one payload turned into. The lines themselves went into the caller's buffer.
#[derive(Debug, Default)]
pub struct Decoded {
    pub accepted: u32,
    pub rejected: Vec<DecodeError>,
}

/// The payload format, from the MQTT 5 content type or sniffed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Cbor,
    Json,
}

/// Picks the format: the content type when there is one, else the first non-blank byte.
pub fn format_of(payload: &[u8], content_type: Option<&str>) -> Result<Format, DecodeError> {
    if let Some(ct) = content_type {
        // Parameters such as `; charset=utf-8` do not change the format.
        let essence = ct.split(';').next().unwrap_or("").trim();
        return if essence.eq_ignore_ascii_case("application/cbor") {
            Ok(Format::Cbor)
        } else if essence.eq_ignore_ascii_case("application/json") {
            Ok(Format::Json)
        } else {
            Err(DecodeError::UnsupportedContentType(
                ct.chars().take(64).collect(),
            ))
        };
    }
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{' | b'[') => Ok(Format::Json),
        _ => Ok(Format::Cbor),
    }
}

/// Turns payloads into line protocol. One per ingest task: it owns the scratch space that
/// makes decoding allocation-free in the steady state.
pub struct Decoder {
    limits: Limits,
    pattern: TopicPattern,
    builder: ReadingBuilder,
}

impl Decoder {
    pub fn new(limits: Limits, pattern: TopicPattern) -> Self {
        Self {
            limits,
            pattern,
            builder: ReadingBuilder::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes one MQTT message, appending a line per accepted reading to `out`.
    ///
    /// `Err` means the whole payload was refused and `out` is as it was.
    pub fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        content_type: Option<&str>,
        now_ns: i64,
        out: &mut Vec<u8>,
    ) -> Result<Decoded, DecodeError> {
        let (device, measurement) = self.pattern.match_topic(topic)?;
        if payload.len() > self.limits.max_payload_bytes {
            return Err(DecodeError::PayloadTooLarge {
                size: payload.len(),
                max: self.limits.max_payload_bytes,
            });
        }
        if payload.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(DecodeError::EmptyPayload);
        }
        let target = Target {
            device,
            measurement,
            now_ns,
            limits: &self.limits,
        };
        let start = out.len();
        let mut outcome = Decoded::default();
        let result = match format_of(payload, content_type)? {
            Format::Cbor => cbor::decode(payload, &target, &mut self.builder, out, &mut outcome),
            Format::Json => json::decode(payload, &target, &mut self.builder, out, &mut outcome),
        };
        match result {
            Ok(()) => Ok(outcome),
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
}

/// Where the readings of one payload go.
pub(crate) struct Target<'a> {
    pub device: &'a str,
    pub measurement: &'a str,
    pub now_ns: i64,
    pub limits: &'a Limits,
}

/// A timestamp as the payload gave it, before the unit is applied.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawTs {
    /// An integer in the configured unit.
    Int(i128),
    /// Seconds with a fraction (a JSON or CBOR float, or CBOR tag 1 with a float).
    Seconds(f64),
    /// Whole seconds (CBOR tag 1 with an integer).
    EpochSeconds(i128),
    /// RFC 3339 text, stored in the builder's arena.
    Text(Span),
}

/// A range in the builder's text arena; u32 keeps the entries small.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span(u32, u32);

impl Span {
    fn range(self) -> Range<usize> {
        self.0 as usize..self.1 as usize
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Val {
    Float(f64),
    Int(i64),
    Bool(bool),
    Text(Span),
}

/// One reading under construction. Reused for every reading: after the first few messages
/// its vectors have the capacity they need and decoding allocates nothing.
#[derive(Default)]
pub(crate) struct ReadingBuilder {
    text: String,
    tags: Vec<(Span, Span)>,
    fields: Vec<(Span, Val)>,
    ts: Option<RawTs>,
    saw_fields: bool,
    error: Option<DecodeError>,
    /// Kept across readings, unlike the rest.
    series: SeriesCache,
}

/// The last series written: the readings of one message nearly always share their
/// measurement, device and tags, and then their line starts with the same bytes. Those are
/// copied instead of being sorted, checked and escaped again.
#[derive(Default)]
struct SeriesCache {
    /// Measurement, device, then each tag key and value in the payload's order, every part
    /// preceded by its length: the input the prefix was made from.
    input: Vec<u8>,
    /// `measurement,tag=value,...` as it was written.
    prefix: Vec<u8>,
}

impl SeriesCache {
    /// True when these are the inputs of the cached prefix.
    fn holds(&self, target: &Target<'_>, text: &str, tags: &[(Span, Span)]) -> bool {
        let mut rest = self.input.as_slice();
        let mut next = |part: &str| match rest.split_first_chunk::<4>() {
            Some((len, tail))
                if u32::from_le_bytes(*len) as usize == part.len()
                    && tail.starts_with(part.as_bytes()) =>
            {
                rest = &tail[part.len()..];
                true
            }
            _ => false,
        };
        next(target.measurement)
            && next(target.device)
            && tags
                .iter()
                .all(|(k, v)| next(&text[k.range()]) && next(&text[v.range()]))
            && rest.is_empty()
    }

    /// Records the inputs of the prefix about to be written; until [`Self::set_prefix`] the
    /// cache holds nothing.
    fn begin(&mut self, target: &Target<'_>, text: &str, tags: &[(Span, Span)]) {
        self.input.clear();
        self.prefix.clear();
        let mut push = |part: &str| {
            // Parts are bounded by the payload size limit, far below 4 GiB.
            self.input
                .extend_from_slice(&(part.len() as u32).to_le_bytes());
            self.input.extend_from_slice(part.as_bytes());
        };
        push(target.measurement);
        push(target.device);
        for (k, v) in tags {
            push(&text[k.range()]);
            push(&text[v.range()]);
        }
    }

    fn set_prefix(&mut self, prefix: &[u8]) {
        self.prefix.extend_from_slice(prefix);
    }

    fn forget(&mut self) {
        self.input.clear();
        self.prefix.clear();
    }
}

impl ReadingBuilder {
    pub fn reset(&mut self) {
        self.text.clear();
        self.tags.clear();
        self.fields.clear();
        self.ts = None;
        self.saw_fields = false;
        self.error = None;
    }

    /// Records the first rule the reading breaks; the format walker keeps consuming the
    /// reading so that the next one starts in the right place.
    pub fn fail(&mut self, error: DecodeError) {
        if self.error.is_none() {
            self.error = Some(error);
        }
    }

    /// The arena position where the next text starts; pair with [`Self::end_text`].
    pub fn begin_text(&self) -> u32 {
        self.text.len() as u32
    }

    pub fn text_mut(&mut self) -> &mut String {
        &mut self.text
    }

    pub fn end_text(&self, start: u32) -> Span {
        Span(start, self.text.len() as u32)
    }

    pub fn push_text(&mut self, s: &str) -> Span {
        let start = self.begin_text();
        self.text.push_str(s);
        self.end_text(start)
    }

    pub fn str(&self, span: Span) -> &str {
        &self.text[span.range()]
    }

    pub fn saw_fields(&mut self) {
        self.saw_fields = true;
    }

    /// Checks a key just read into the arena.
    pub fn check_key(&mut self, key: Span, limits: &Limits) -> bool {
        let k = self.str(key);
        let err = if k.is_empty() {
            Some(DecodeError::EmptyKey)
        } else if k.len() > limits.max_key_bytes {
            Some(DecodeError::KeyTooLong {
                len: k.len(),
                max: limits.max_key_bytes,
            })
        } else {
            line_protocol::name_fault(k).map(name_error)
        };
        match err {
            Some(e) => {
                self.fail(e);
                false
            }
            None => true,
        }
    }

    /// Checks the length of a text value; `len` is known before the text is read.
    pub fn check_text_len(&mut self, len: usize, limits: &Limits) -> bool {
        if len > limits.max_text_bytes {
            self.fail(DecodeError::TextTooLong {
                len,
                max: limits.max_text_bytes,
            });
            false
        } else {
            true
        }
    }

    pub fn add_tag(&mut self, key: Span, value: Span) {
        let v = self.str(value);
        if v.is_empty() {
            let k = self.str(key).to_owned();
            self.fail(DecodeError::EmptyTagValue(k));
        } else if let Some(fault) = line_protocol::name_fault(v) {
            self.fail(name_error(fault));
        } else {
            self.tags.push((key, value));
        }
    }

    pub fn add_tag_number(&mut self, key: Span, n: Number) {
        let start = self.begin_text();
        match n {
            Number::Int(i) => {
                let mut buf = itoa::Buffer::new();
                self.text.push_str(buf.format(i));
            }
            Number::Float(f) if f.is_finite() => {
                let mut buf = ryu::Buffer::new();
                self.text.push_str(buf.format_finite(f));
            }
            Number::Float(_) => {
                let k = self.str(key).to_owned();
                return self.fail(DecodeError::NonFinite(k));
            }
        }
        let value = self.end_text(start);
        self.tags.push((key, value));
    }

    pub fn add_tag_bool(&mut self, key: Span, b: bool) {
        let value = self.push_text(if b { "true" } else { "false" });
        self.tags.push((key, value));
    }

    pub fn add_field_number(&mut self, key: Span, n: Number, limits: &Limits) {
        let val = match n {
            Number::Float(f) if !f.is_finite() => {
                let k = self.str(key).to_owned();
                return self.fail(DecodeError::NonFinite(k));
            }
            Number::Float(f) => Val::Float(f),
            Number::Int(i) if limits.keep_integers => match i64::try_from(i) {
                Ok(i) => Val::Int(i),
                Err(_) => {
                    let k = self.str(key).to_owned();
                    return self.fail(DecodeError::IntegerOutOfRange(k));
                }
            },
            // Floats by default, so that 40 and 40.5 never conflict in the sink.
            Number::Int(i) => Val::Float(i as f64),
        };
        self.fields.push((key, val));
    }

    /// A text field: line protocol has no way to carry a line break inside it.
    pub fn add_text_field(&mut self, key: Span, text: Span) {
        if self.str(text).contains(['\n', '\r']) {
            self.fail(DecodeError::ControlCharacter);
        } else {
            self.fields.push((key, Val::Text(text)));
        }
    }

    pub fn add_field(&mut self, key: Span, val: Val) {
        self.fields.push((key, val));
    }

    pub fn set_ts(&mut self, ts: RawTs) {
        self.ts = Some(ts);
    }

    /// A value of the wrong kind for `key`.
    pub fn bad_value(&mut self, key: Span, found: &'static str) {
        let key = self.str(key).to_owned();
        self.fail(DecodeError::BadValue { key, found });
    }

    pub fn nested(&mut self, key: Span) {
        let key = self.str(key).to_owned();
        self.fail(DecodeError::NestedValue(key));
    }

    /// Applies the reading-wide rules and, if they hold, appends its line to `out`.
    pub fn finish(&mut self, target: &Target<'_>, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let limits = target.limits;
        if !self.saw_fields {
            return Err(DecodeError::MissingFields);
        }
        if self.fields.is_empty() {
            return Err(DecodeError::EmptyFields);
        }
        if self.fields.len() > limits.max_fields_per_reading {
            return Err(DecodeError::TooManyFields {
                count: self.fields.len(),
                max: limits.max_fields_per_reading,
            });
        }
        let ts_ns = self.timestamp(target)?;
        if self.series.holds(target, &self.text, &self.tags) {
            out.extend_from_slice(&self.series.prefix);
        } else {
            self.write_series(target, out)?;
        }
        let text = &self.text;
        // Field order means nothing to the sink, so fields are only checked for duplicates:
        // pairwise for the usual handful, by sorting when there are many.
        let fields = &mut self.fields;
        let key = |i: usize, f: &[(Span, Val)]| &text[f[i].0.range()];
        let duplicate = if fields.len() <= 16 {
            (0..fields.len())
                .find(|&i| (i + 1..fields.len()).any(|j| key(i, fields) == key(j, fields)))
        } else {
            fields.sort_unstable_by(|a, b| text[a.0.range()].cmp(&text[b.0.range()]));
            (1..fields.len()).find(|&i| key(i - 1, fields) == key(i, fields))
        };
        if let Some(i) = duplicate {
            return Err(DecodeError::DuplicateKey(key(i, fields).to_owned()));
        }

        out.push(b' ');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            let value = match *v {
                Val::Float(f) => FieldValue::Float(f),
                Val::Int(i) => FieldValue::Integer(i),
                Val::Bool(b) => FieldValue::Bool(b),
                Val::Text(s) => FieldValue::Text(&text[s.range()]),
            };
            line_protocol::push_field(out, i == 0, &text[k.range()], value);
        }
        line_protocol::push_timestamp(out, ts_ns);
        Ok(())
    }

    /// Writes `measurement,tag=value,...` for this reading's tags and remembers it.
    fn write_series(&mut self, target: &Target<'_>, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        self.series.begin(target, &self.text, &self.tags);
        // The topic names the device; a `device` tag in the payload yields to it.
        self.tags.retain(|(k, _)| &self.text[k.range()] != "device");
        let device = self.push_text(target.device);
        let device_key = self.push_text("device");
        self.tags.push((device_key, device));

        // Sorted tags are InfluxDB's canonical series key; sorting also finds duplicates.
        let text = &self.text;
        self.tags
            .sort_unstable_by(|a, b| text[a.0.range()].cmp(&text[b.0.range()]));
        if let Some(w) = self
            .tags
            .windows(2)
            .find(|w| text[w[0].0.range()] == text[w[1].0.range()])
        {
            self.series.forget();
            return Err(DecodeError::DuplicateKey(text[w[0].0.range()].to_owned()));
        }
        let start = out.len();
        line_protocol::push_measurement(out, target.measurement);
        for (k, v) in &self.tags {
            line_protocol::push_tag(out, &text[k.range()], &text[v.range()]);
        }
        self.series.set_prefix(&out[start..]);
        Ok(())
    }

    fn timestamp(&self, target: &Target<'_>) -> Result<i64, DecodeError> {
        let limits = target.limits;
        let ns: i128 = match self.ts {
            None => return Ok(target.now_ns),
            Some(RawTs::Int(v)) => v
                .checked_mul(limits.timestamp_unit.nanos())
                .ok_or_else(|| DecodeError::BadTimestamp(format!("{v} is out of range")))?,
            Some(RawTs::EpochSeconds(v)) => v
                .checked_mul(1_000_000_000)
                .ok_or_else(|| DecodeError::BadTimestamp(format!("{v} is out of range")))?,
            Some(RawTs::Seconds(f)) => {
                if !f.is_finite() || f.abs() > 9.2e9 {
                    return Err(DecodeError::BadTimestamp(format!("{f} is out of range")));
                }
                // At today's epoch an f64 resolves about 0.24 µs, so digits below the
                // microsecond are noise: round there, keeping 1764126000.123 exact.
                (f * 1e6).round() as i128 * 1_000
            }
            Some(RawTs::Text(span)) => {
                let s = self.str(span);
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                        DecodeError::BadTimestamp(format!(
                            "{:?} is not RFC 3339: {e}",
                            s.chars().take(64).collect::<String>()
                        ))
                    })?
                    .unix_timestamp_nanos()
            }
        };
        let ns = i64::try_from(ns)
            .map_err(|_| DecodeError::BadTimestamp(format!("{ns} ns does not fit in 64 bits")))?;
        if limits.max_age_ns > 0 && ns < target.now_ns.saturating_sub(limits.max_age_ns) {
            return Err(DecodeError::TimestampTooOld);
        }
        if limits.max_future_skew_ns > 0
            && ns > target.now_ns.saturating_add(limits.max_future_skew_ns)
        {
            return Err(DecodeError::TimestampInFuture);
        }
        Ok(ns)
    }
}

fn name_error(fault: line_protocol::NameFault) -> DecodeError {
    match fault {
        line_protocol::NameFault::Control => DecodeError::ControlCharacter,
        line_protocol::NameFault::Backslash => DecodeError::UnencodableBackslash,
    }
}

/// A number as the payload spelled it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Number {
    Int(i128),
    Float(f64),
}

/// Records the outcome of one reading.
pub(crate) fn finish_reading(
    builder: &mut ReadingBuilder,
    target: &Target<'_>,
    out: &mut Vec<u8>,
    outcome: &mut Decoded,
) {
    let start = out.len();
    match builder.finish(target, out) {
        Ok(()) => outcome.accepted += 1,
        Err(e) => {
            out.truncate(start);
            outcome.rejected.push(e);
        }
    }
}

#[cfg(test)]
mod tests;
