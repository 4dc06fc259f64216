//! CBOR (RFC 8949) payloads, walked header by header.
//!
//! Walking headers instead of building a `ciborium::Value` tree lets text go straight into the
//! reading's arena (no allocation per key or value) and lets us see CBOR tags 0 and 1 on `ts`,
//! which serde's data model hides. The headers are read by [`Reader`], straight from the
//! payload slice: ciborium_ll's decoder reads each header through a `Read` of one to nine
//! bytes and a `Title`, which was a quarter of the decode time.

use ciborium_ll::{simple, Header};

use super::{
    finish_reading, DecodeError, Decoded, Number, RawTs, ReadingBuilder, Span, Target, Val,
    MAX_DEPTH,
};

/// CBOR headers and definite-length strings, read in place from the payload.
struct Reader<'p> {
    buf: &'p [u8],
    pos: usize,
    /// A header given back with [`Reader::push`], returned by the next pull.
    pushed: Option<Header>,
}

fn truncated() -> DecodeError {
    DecodeError::Truncated("CBOR item cut short".into())
}

impl<'p> Reader<'p> {
    fn new(buf: &'p [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            pushed: None,
        }
    }

    fn offset(&self) -> usize {
        self.pos
    }

    fn push(&mut self, header: Header) {
        self.pushed = Some(header);
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'p [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(truncated)?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    #[inline]
    fn pull(&mut self) -> Result<Header, DecodeError> {
        if let Some(header) = self.pushed.take() {
            return Ok(header);
        }
        let at = self.pos;
        let initial = self.take(1)?[0];
        let (major, info) = (initial >> 5, initial & 0x1f);
        let argument = match info {
            0..=23 => Some(u64::from(info)),
            24 => Some(u64::from(self.take(1)?[0])),
            25 => Some(u64::from(u16::from_be_bytes(self.array()?))),
            26 => Some(u64::from(u32::from_be_bytes(self.array()?))),
            27 => Some(u64::from_be_bytes(self.array()?)),
            31 => None,
            _ => return Err(invalid(at)),
        };
        // A length beyond the address space cannot be in the payload: it reads as cut short.
        let len = |n: Option<u64>| n.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        Ok(match (major, argument) {
            (0, Some(v)) => Header::Positive(v),
            (1, Some(v)) => Header::Negative(v),
            (2, n) => Header::Bytes(len(n)),
            (3, n) => Header::Text(len(n)),
            (4, n) => Header::Array(len(n)),
            (5, n) => Header::Map(len(n)),
            (6, Some(t)) => Header::Tag(t),
            (7, _) => match info {
                0..=23 => Header::Simple(info),
                24 => match argument {
                    Some(v) if v >= 32 => Header::Simple(v as u8),
                    _ => return Err(invalid(at)),
                },
                25 => Header::Float(f16_to_f64(argument.unwrap_or(0) as u16)),
                26 => Header::Float(f64::from(f32::from_bits(argument.unwrap_or(0) as u32))),
                27 => Header::Float(f64::from_bits(argument.unwrap_or(0))),
                _ => Header::Break,
            },
            // Integers and tags have no indefinite form.
            _ => return Err(invalid(at)),
        })
    }

    /// The chunks of a byte or text string whose header was just pulled (major type `major`):
    /// one for a definite length, the definite chunks up to the break otherwise.
    fn chunks(
        &mut self,
        len: Option<usize>,
        text: bool,
        mut each: impl FnMut(&'p [u8]) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        if let Some(n) = len {
            return each(self.take(n)?);
        }
        loop {
            let at = self.pos;
            match (self.pull()?, text) {
                (Header::Break, _) => return Ok(()),
                (Header::Text(Some(n)), true) | (Header::Bytes(Some(n)), false) => {
                    each(self.take(n)?)?
                }
                _ => return Err(invalid(at)),
            }
        }
    }
}

fn invalid(at: usize) -> DecodeError {
    DecodeError::MalformedCbor(format!("invalid item at byte {at}"))
}

/// IEEE 754 half precision, widened. Built from the bits: every half is exact in an f64, and
/// simulated sensors send many small whole numbers that CBOR encoders shrink to halves.
fn f16_to_f64(h: u16) -> f64 {
    let negative = h & 0x8000 != 0;
    let exponent = u64::from((h >> 10) & 0x1f);
    let mantissa = u64::from(h & 0x3ff);
    let magnitude = match exponent {
        // Subnormal: mantissa × 2^-24 (f64 exponent 1023 - 24).
        0 => mantissa as f64 * f64::from_bits(999 << 52),
        31 if mantissa == 0 => f64::INFINITY,
        31 => return f64::NAN,
        // Rebias 15 → 1023 and move the 10 mantissa bits to the top of f64's 52.
        e => f64::from_bits(((e + 1008) << 52) | (mantissa << 42)),
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

pub(crate) fn decode(
    payload: &[u8],
    target: &Target<'_>,
    builder: &mut ReadingBuilder,
    out: &mut Vec<u8>,
    outcome: &mut Decoded,
) -> Result<(), DecodeError> {
    let mut dec = Reader::new(payload);
    let mut w = Walker {
        dec: &mut dec,
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
            finish_reading(w.builder, target, out, outcome);
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
                        finish_reading(w.builder, target, out, outcome);
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
    dec: &'d mut Reader<'p>,
    builder: &'b mut ReadingBuilder,
    target: &'t Target<'l>,
}

impl Walker<'_, '_, '_, '_, '_> {
    fn pull(&mut self) -> Result<Header, DecodeError> {
        self.dec.pull()
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
                Header::Text(Some(n)) if n <= 8 => match self.dec.take(n)? {
                    b"fields" => Some(Part::Fields),
                    b"tags" => Some(Part::Tags),
                    b"ts" => Some(Part::Ts),
                    other => {
                        // Checked like any text: broken UTF-8 makes the payload malformed
                        // (found by the `cbor` fuzz target against ciborium).
                        let other = std::str::from_utf8(other)
                            .map_err(|_| DecodeError::MalformedCbor("text is not UTF-8".into()))?;
                        self.builder.fail(DecodeError::UnknownKey(other.to_owned()));
                        None
                    }
                },
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

    /// Reads a text item whose header was just pulled into the builder's arena.
    fn text(&mut self, len: Option<usize>) -> Result<Span, DecodeError> {
        let start = self.builder.begin_text();
        let builder = &mut *self.builder;
        self.dec.chunks(len, true, |chunk| {
            let s = std::str::from_utf8(chunk)
                .map_err(|_| DecodeError::MalformedCbor("text is not UTF-8".into()))?;
            builder.text_mut().push_str(s);
            Ok(())
        })?;
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
            Header::Bytes(len) => self.dec.chunks(len, false, |_| Ok(()))?,
            // Skipped text is still checked: a payload with broken UTF-8 is malformed.
            Header::Text(len) => self.dec.chunks(len, true, |chunk| {
                std::str::from_utf8(chunk)
                    .map(|_| ())
                    .map_err(|_| DecodeError::MalformedCbor("text is not UTF-8".into()))
            })?,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every header and string chunk our reader sees, as ciborium_ll's decoder sees them.
    fn headers_ours(bytes: &[u8]) -> Result<Vec<String>, DecodeError> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::new();
        while r.offset() < bytes.len() {
            let h = r.pull()?;
            out.push(format!("{h:?}"));
            if let Header::Text(Some(n)) | Header::Bytes(Some(n)) = h {
                out.push(format!("{:?}", r.take(n)?));
            }
        }
        Ok(out)
    }

    fn headers_ciborium(bytes: &[u8]) -> Option<Vec<String>> {
        let mut d = ciborium_ll::Decoder::from(bytes);
        let mut out = Vec::new();
        while d.offset() < bytes.len() {
            let h = d.pull().ok()?;
            out.push(format!("{h:?}"));
            if let Header::Text(Some(n)) | Header::Bytes(Some(n)) = h {
                let mut buf = vec![0; n];
                ciborium_io::Read::read_exact(&mut d, &mut buf).ok()?;
                out.push(format!("{:?}", &buf[..]));
            }
        }
        Some(out)
    }

    #[test]
    fn headers_match_ciborium() {
        let mut cases: Vec<Vec<u8>> = vec![
            vec![0xf9, 0x3c, 0x00],                                     // half 1.0
            vec![0xf9, 0x7c, 0x00],                                     // half +inf
            vec![0xf9, 0x00, 0x01],                                     // smallest subnormal half
            vec![0xf9, 0xc4, 0x00],                                     // half -4.0
            vec![0xfa, 0x47, 0xc3, 0x50, 0x00],                         // single 100000.0
            vec![0x7f, 0x62, b'h', b'i', 0x61, b'!', 0xff],             // indefinite text
            vec![0x5f, 0x41, 1, 0xff],                                  // indefinite bytes
            vec![0x9f, 0x01, 0xff],                                     // indefinite array
            vec![0xbf, 0x61, b'a', 0x01, 0xff],                         // indefinite map
            vec![0xc1, 0x1a, 0x65, 0x00, 0x00, 0x00],                   // tag 1
            vec![0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // most negative
            vec![0xf8, 0x20],                                           // simple 32
            vec![0xf4, 0xf5, 0xf6, 0xf7],                               // false true null undefined
        ];
        for v in [
            ciborium::Value::Float(1.5),
            ciborium::Value::Float(f64::MAX),
            ciborium::Value::Integer(u64::MAX.into()),
            ciborium::Value::Text("é ü".into()),
        ] {
            let mut bytes = Vec::new();
            ciborium::into_writer(&v, &mut bytes).expect("encode");
            cases.push(bytes);
        }
        for bytes in cases {
            let ours = headers_ours(&bytes).expect("valid CBOR");
            assert_eq!(Some(ours), headers_ciborium(&bytes), "{bytes:02x?}");
        }
    }

    #[test]
    fn broken_headers_are_errors() {
        for bytes in [
            &[0x1c][..],         // reserved additional information 28
            &[0x1f],             // an indefinite integer
            &[0xdf],             // an indefinite tag
            &[0xf8, 0x10],       // simple value below 32 in two bytes
            &[0x1a, 0x00, 0x01], // argument cut short
            &[0x7f, 0x01, 0xff], // an integer inside indefinite text
        ] {
            let mut r = Reader::new(bytes);
            let result = r.pull().and_then(|h| match h {
                Header::Text(len) => r.chunks(len, true, |_| Ok(())).map(|_| h),
                h => Ok(h),
            });
            assert!(result.is_err(), "{bytes:02x?} gave {result:?}");
        }
    }

    #[test]
    fn every_half_widens_to_its_value() {
        // The definition, term by term (IEEE 754 binary16), against the bit-built widening.
        for h in 0..=u16::MAX {
            let sign = if h & 0x8000 == 0 { 1.0 } else { -1.0 };
            let exponent = i32::from((h >> 10) & 0x1f);
            let mantissa = f64::from(h & 0x3ff);
            let want = match exponent {
                0 => sign * mantissa * 2f64.powi(-24),
                31 if mantissa == 0.0 => sign * f64::INFINITY,
                31 => f64::NAN,
                e => sign * (1.0 + mantissa / 1024.0) * 2f64.powi(e - 15),
            };
            let got = f16_to_f64(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }
}
