//! CBOR (RFC 8949) payloads, walked with ciborium's low-level decoder.
//!
//! Walking headers instead of building a `ciborium::Value` tree lets text go straight into the
//! reading's arena (no allocation per key or value) and lets us see CBOR tags 0 and 1 on `ts`,
//! which serde's data model hides.

use ciborium_ll::{simple, Decoder, Header};

use super::{
    settle, DecodeError, Number, Outcome, RawTs, ReadingBuilder, Span, Target, Val, MAX_DEPTH,
};

type Dec<'p> = Decoder<Slice<'p>>;

/// The payload as ciborium's reader. Reading `&[u8]` through `std::io::Read` builds an
/// `io::Error` for every short read; this reader's error is a unit, and the hot path is a
/// bounds check and a copy.
struct Slice<'p>(&'p [u8]);

#[derive(Debug)]
struct EndOfPayload;

impl ciborium_io::Read for Slice<'_> {
    type Error = EndOfPayload;

    #[inline]
    fn read_exact(&mut self, data: &mut [u8]) -> Result<(), EndOfPayload> {
        if data.len() > self.0.len() {
            return Err(EndOfPayload);
        }
        let (head, tail) = self.0.split_at(data.len());
        data.copy_from_slice(head);
        self.0 = tail;
        Ok(())
    }
}

/// Text up to this long is read in one copy through the stack; longer text streams through
/// ciborium's segments in chunks of this size.
const CHUNK: usize = 256;

pub(crate) fn decode(
    payload: &[u8],
    target: &Target<'_>,
    builder: &mut ReadingBuilder,
    out: &mut Vec<u8>,
    outcome: &mut Outcome,
) -> Result<(), DecodeError> {
    let mut dec = Decoder::from(Slice(payload));
    let mut w = Walker {
        dec: &mut dec,
        buf: [0; CHUNK],
        builder,
        target,
    };
    let mut header = w.pull()?;
    // A self-described CBOR payload (tag 55799) or any other outer tag wraps the same item.
    while let Header::Tag(_) = header {
        header = w.pull()?;
    }
    match header {
        Header::Map(len) => {
            w.reading(len)?;
            settle(w.builder, target, out, outcome);
        }
        Header::Array(len) => {
            let max = target.limits.max_readings_per_payload;
            if let Some(n) = len.filter(|n| *n > max) {
                return Err(DecodeError::TooManyReadings { count: n, max });
            }
            let mut remaining = len;
            let mut count = 0usize;
            while w.next_entry(&mut remaining)? {
                count += 1;
                if count > max {
                    return Err(DecodeError::TooManyReadings { count, max });
                }
                match w.pull()? {
                    Header::Map(len) => {
                        w.reading(len)?;
                        settle(w.builder, target, out, outcome);
                    }
                    other => {
                        w.skip_after(other, 1)?;
                        outcome.rejected.push(DecodeError::NotAMap(kind(&other)));
                    }
                }
            }
        }
        other => {
            w.skip_after(other, 0)?;
            outcome.rejected.push(DecodeError::NotAMap(kind(&other)));
        }
    }
    let used = dec.offset();
    if used < payload.len() {
        return Err(DecodeError::TrailingBytes(payload.len() - used));
    }
    Ok(())
}

struct Walker<'d, 'p, 'b, 't, 'l> {
    dec: &'d mut Dec<'p>,
    buf: [u8; CHUNK],
    builder: &'b mut ReadingBuilder,
    target: &'t Target<'l>,
}

impl Walker<'_, '_, '_, '_, '_> {
    fn pull(&mut self) -> Result<Header, DecodeError> {
        self.dec.pull().map_err(ll_error)
    }

    /// Advances a map or array counter; `None` counts an indefinite-length item up to its break.
    fn next_entry(&mut self, remaining: &mut Option<usize>) -> Result<bool, DecodeError> {
        match remaining {
            Some(0) => Ok(false),
            Some(n) => {
                *n -= 1;
                Ok(true)
            }
            None => match self.pull()? {
                Header::Break => Ok(false),
                h => {
                    self.dec.push(h);
                    Ok(true)
                }
            },
        }
    }

    /// Reads one reading's map into the builder. `Err` only when the payload itself is broken.
    fn reading(&mut self, len: Option<usize>) -> Result<(), DecodeError> {
        self.builder.reset();
        let mut remaining = len;
        while self.next_entry(&mut remaining)? {
            let key = match self.pull()? {
                // The three keys of a reading are short: compare them in place.
                Header::Text(Some(n)) if n <= 8 => {
                    self.read_exact(n)?;
                    match &self.buf[..n] {
                        b"fields" => Some(Part::Fields),
                        b"tags" => Some(Part::Tags),
                        b"ts" => Some(Part::Ts),
                        other => {
                            let other = String::from_utf8_lossy(other).into_owned();
                            self.builder.fail(DecodeError::UnknownKey(other));
                            None
                        }
                    }
                }
                Header::Text(len) => {
                    let span = self.text(len)?;
                    let mark = span.0;
                    let which = match self.builder.str(span) {
                        "fields" => Some(Part::Fields),
                        "tags" => Some(Part::Tags),
                        "ts" => Some(Part::Ts),
                        other => {
                            let other = other.chars().take(64).collect();
                            self.builder.fail(DecodeError::UnknownKey(other));
                            None
                        }
                    };
                    // The key itself is not needed past this point.
                    self.builder.text_mut().truncate(mark as usize);
                    which
                }
                other => {
                    self.skip_after(other, 2)?;
                    self.builder.fail(DecodeError::BadKey(kind(&other)));
                    None
                }
            };
            match key {
                Some(Part::Fields) => self.fields()?,
                Some(Part::Tags) => self.tags()?,
                Some(Part::Ts) => self.ts()?,
                None => self.skip(2)?,
            }
        }
        Ok(())
    }

    fn fields(&mut self) -> Result<(), DecodeError> {
        self.builder.saw_fields();
        let len = match self.pull()? {
            Header::Map(len) => len,
            other => {
                self.skip_after(other, 2)?;
                self.builder.fail(DecodeError::BadFields(kind(&other)));
                return Ok(());
            }
        };
        let limits = self.target.limits;
        let mut remaining = len;
        'entries: while self.next_entry(&mut remaining)? {
            let Some(key) = self.map_key(3)? else {
                self.skip(3)?;
                continue;
            };
            let mut header = self.pull()?;
            while let Header::Tag(t) = header {
                if t == 2 || t == 3 {
                    // Bignums: more than 64 bits by definition.
                    self.skip(4)?;
                    let k = self.builder.str(key).to_owned();
                    self.builder.fail(DecodeError::IntegerOutOfRange(k));
                    continue 'entries;
                }
                header = self.pull()?;
            }
            match header {
                Header::Positive(u) => {
                    self.builder
                        .add_field_number(key, Number::Int(u.into()), limits)
                }
                Header::Negative(n) => {
                    self.builder
                        .add_field_number(key, Number::Int(negative(n)), limits)
                }
                Header::Float(f) => self.builder.add_field_number(key, Number::Float(f), limits),
                Header::Simple(simple::FALSE) => self.builder.add_field(key, Val::Bool(false)),
                Header::Simple(simple::TRUE) => self.builder.add_field(key, Val::Bool(true)),
                Header::Text(len) => {
                    if self.builder.check_text_len(len.unwrap_or(0), limits) {
                        let span = self.text(len)?;
                        if self
                            .builder
                            .check_text_len(self.builder.str(span).len(), limits)
                        {
                            self.builder.add_text_field(key, span);
                        }
                    } else {
                        self.skip_after(header, 3)?;
                    }
                }
                Header::Array(_) | Header::Map(_) => {
                    self.skip_after(header, 3)?;
                    self.builder.nested(key);
                }
                other => {
                    self.skip_after(other, 3)?;
                    self.builder.bad_value(key, kind(&other));
                }
            }
        }
        Ok(())
    }

    fn tags(&mut self) -> Result<(), DecodeError> {
        let len = match self.pull()? {
            Header::Map(len) => len,
            other => {
                self.skip_after(other, 2)?;
                self.builder.fail(DecodeError::BadTags(kind(&other)));
                return Ok(());
            }
        };
        let limits = self.target.limits;
        let mut remaining = len;
        while self.next_entry(&mut remaining)? {
            let Some(key) = self.map_key(3)? else {
                self.skip(3)?;
                continue;
            };
            let mut header = self.pull()?;
            while let Header::Tag(_) = header {
                header = self.pull()?;
            }
            match header {
                Header::Text(len) => {
                    if self.builder.check_text_len(len.unwrap_or(0), limits) {
                        let span = self.text(len)?;
                        if self
                            .builder
                            .check_text_len(self.builder.str(span).len(), limits)
                        {
                            self.builder.add_tag(key, span);
                        }
                    } else {
                        self.skip_after(header, 3)?;
                    }
                }
                Header::Positive(u) => self.builder.add_tag_number(key, Number::Int(u.into())),
                Header::Negative(n) => self.builder.add_tag_number(key, Number::Int(negative(n))),
                Header::Float(f) => self.builder.add_tag_number(key, Number::Float(f)),
                Header::Simple(simple::FALSE) => self.builder.add_tag_bool(key, false),
                Header::Simple(simple::TRUE) => self.builder.add_tag_bool(key, true),
                Header::Array(_) | Header::Map(_) => {
                    self.skip_after(header, 3)?;
                    self.builder.nested(key);
                }
                other => {
                    self.skip_after(other, 3)?;
                    self.builder.bad_value(key, kind(&other));
                }
            }
        }
        Ok(())
    }

    fn ts(&mut self) -> Result<(), DecodeError> {
        let header = self.pull()?;
        let raw = match header {
            Header::Tag(1) => match self.pull()? {
                Header::Positive(u) => RawTs::EpochSeconds(u.into()),
                Header::Negative(n) => RawTs::EpochSeconds(negative(n)),
                Header::Float(f) => RawTs::Seconds(f),
                other => return self.bad_ts(other, "CBOR tag 1 must hold a number"),
            },
            Header::Tag(0) => match self.pull()? {
                Header::Text(len) => self.ts_text(len)?,
                other => return self.bad_ts(other, "CBOR tag 0 must hold text"),
            },
            Header::Tag(t) => {
                self.skip(3)?;
                self.builder.fail(DecodeError::BadTimestamp(format!(
                    "unsupported CBOR tag {t}"
                )));
                return Ok(());
            }
            Header::Positive(u) => RawTs::Int(u.into()),
            Header::Negative(n) => RawTs::Int(negative(n)),
            Header::Float(f) => RawTs::Seconds(f),
            Header::Text(len) => self.ts_text(len)?,
            other => return self.bad_ts(other, "expected a number or text"),
        };
        self.builder.set_ts(raw);
        Ok(())
    }

    fn ts_text(&mut self, len: Option<usize>) -> Result<RawTs, DecodeError> {
        // RFC 3339 text is short; refuse anything long before reading it.
        if len.is_some_and(|l| l > 64) {
            self.skip_after(Header::Text(len), 3)?;
            self.builder.fail(DecodeError::BadTimestamp(
                "text longer than 64 bytes".into(),
            ));
            return Ok(RawTs::Int(0));
        }
        Ok(RawTs::Text(self.text(len)?))
    }

    fn bad_ts(&mut self, header: Header, why: &str) -> Result<(), DecodeError> {
        self.skip_after(header, 3)?;
        self.builder.fail(DecodeError::BadTimestamp(format!(
            "{why}, found {}",
            kind(&header)
        )));
        Ok(())
    }

    /// Reads a map key into the arena and checks it; `None` when it is unusable (the reason
    /// is recorded and the caller skips the value).
    fn map_key(&mut self, depth: usize) -> Result<Option<Span>, DecodeError> {
        match self.pull()? {
            Header::Text(len) => {
                let limits = self.target.limits;
                if len.is_some_and(|l| l > limits.max_key_bytes) {
                    self.skip_after(Header::Text(len), depth)?;
                    self.builder.fail(DecodeError::KeyTooLong {
                        len: len.unwrap_or(0),
                        max: limits.max_key_bytes,
                    });
                    return Ok(None);
                }
                let span = self.text(len)?;
                Ok(self.builder.check_key(span, limits).then_some(span))
            }
            other => {
                self.skip_after(other, depth)?;
                self.builder.fail(DecodeError::BadKey(kind(&other)));
                Ok(None)
            }
        }
    }

    /// Reads the next `n` raw bytes into the chunk buffer (`n <= CHUNK`).
    fn read_exact(&mut self, n: usize) -> Result<(), DecodeError> {
        ciborium_io::Read::read_exact(self.dec, &mut self.buf[..n])
            .map_err(|EndOfPayload| DecodeError::Truncated("CBOR item cut short".into()))
    }

    /// Reads a text item whose header was just pulled into the builder's arena.
    fn text(&mut self, len: Option<usize>) -> Result<Span, DecodeError> {
        let start = self.builder.begin_text();
        // Definite-length text that fits the chunk buffer, by far the common case, skips
        // ciborium's segment machinery.
        if let Some(n) = len.filter(|n| *n <= CHUNK) {
            self.read_exact(n)?;
            let s = std::str::from_utf8(&self.buf[..n])
                .map_err(|_| DecodeError::MalformedCbor("text is not UTF-8".into()))?;
            self.builder.text_mut().push_str(s);
            return Ok(self.builder.end_text(start));
        }
        let mut segments = self.dec.text(len);
        while let Some(mut segment) = segments.pull().map_err(ll_error)? {
            while let Some(chunk) = segment.pull(&mut self.buf).map_err(ll_error)? {
                self.builder.text_mut().push_str(chunk);
            }
        }
        Ok(self.builder.end_text(start))
    }

    fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        let header = self.pull()?;
        self.skip_after(header, depth)
    }

    /// Consumes the rest of an item whose header was just pulled.
    fn skip_after(&mut self, header: Header, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep(MAX_DEPTH));
        }
        match header {
            Header::Positive(_) | Header::Negative(_) | Header::Float(_) | Header::Simple(_) => {}
            Header::Tag(_) => self.skip(depth + 1)?,
            Header::Bytes(len) => {
                let mut segments = self.dec.bytes(len);
                while let Some(mut segment) = segments.pull().map_err(ll_error)? {
                    while segment.pull(&mut self.buf).map_err(ll_error)?.is_some() {}
                }
            }
            Header::Text(len) => {
                let mut segments = self.dec.text(len);
                while let Some(mut segment) = segments.pull().map_err(ll_error)? {
                    while segment.pull(&mut self.buf).map_err(ll_error)?.is_some() {}
                }
            }
            Header::Array(len) => {
                let mut remaining = len;
                while self.next_entry(&mut remaining)? {
                    self.skip(depth + 1)?;
                }
            }
            Header::Map(len) => {
                let mut remaining = len;
                while self.next_entry(&mut remaining)? {
                    self.skip(depth + 1)?;
                    self.skip(depth + 1)?;
                }
            }
            Header::Break => {
                return Err(DecodeError::MalformedCbor("unexpected break".into()));
            }
        }
        Ok(())
    }
}

enum Part {
    Fields,
    Tags,
    Ts,
}

/// CBOR stores a negative integer n as `-1 - n`.
fn negative(n: u64) -> i128 {
    -1 - i128::from(n)
}

fn kind(header: &Header) -> &'static str {
    match header {
        Header::Positive(_) | Header::Negative(_) => "an integer",
        Header::Float(_) => "a float",
        Header::Simple(simple::NULL) => "null",
        Header::Simple(simple::UNDEFINED) => "undefined",
        Header::Simple(_) => "a simple value",
        Header::Tag(_) => "a tagged item",
        Header::Break => "a break",
        Header::Bytes(_) => "a byte string",
        Header::Text(_) => "text",
        Header::Array(_) => "an array",
        Header::Map(_) => "a map",
    }
}

fn ll_error(e: ciborium_ll::Error<EndOfPayload>) -> DecodeError {
    match e {
        ciborium_ll::Error::Io(EndOfPayload) => {
            DecodeError::Truncated("CBOR item cut short".into())
        }
        ciborium_ll::Error::Syntax(offset) => {
            DecodeError::MalformedCbor(format!("invalid item at byte {offset}"))
        }
    }
}
