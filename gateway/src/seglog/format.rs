//! The segment log's on-disk format, shared by the dead-letter queue and the write-ahead log.
//!
//! # Design constraints
//!
//! - Appends only: a record, once its bytes and its fsync are done, is never rewritten, so a
//!   crash can damage at most the record being written (the torn tail).
//! - Every record checks itself (length + CRC32C), so recovery can tell a torn tail or flipped
//!   bits from good data without trusting anything else on disk.
//! - Plain files in one directory, named so that `ls` shows their order, readable without the
//!   gateway running.
//!
//! # Layout
//!
//! ```text
//! <dlq.dir> or <wal.dir>/
//!   LOCK                         held (flock) by the process that writes the log
//!   00000000000000000001.seg     segments, in order; a new one when the active one passes
//!   00000000000000000002.seg     the segment size
//!   deleted.log                  ids of records that were deleted (replayed, purged, or
//!                                written to the sink for the write-ahead log)
//!
//! segment / deleted.log:
//! +----------------------+-----------+-----------+-----------+-----------+-----
//! | magic (8 bytes)      | record    | record    | record    | record    | ...
//! | "GWDLQ001" (DLQ),    |           |           |           |           |
//! | "GWWAL001" (WAL) or  |           |           |           |           |
//! | "GWDEL001" (deleted) |           |           |           |           |
//! +----------------------+-----------+-----------+-----------+-----------+-----
//!
//! record (a frame):
//! +---------------+---------------+------------------------------------------+
//! | len: u32 LE   | crc: u32 LE   | body: `len` bytes                        |
//! |               | CRC32C(body)  |                                          |
//! +---------------+---------------+------------------------------------------+
//!
//! segment record body:                 deleted.log record body:
//! +--------------+--------+--------+   +------------------------------+
//! | meta_len u32 | meta   | data   |   | record id, UTF-8 ("3-4096")  |
//! | LE           | (JSON) | (bytes)|   +------------------------------+
//! +--------------+--------+--------+
//! ```
//!
//! A record's id is `<segment number>-<byte offset of its frame>`: stable for its whole life,
//! and it says where the record is. `meta` is [`super::Meta`] as JSON; `data` is the raw MQTT
//! payload for `rejected_input` records and line protocol otherwise (one line per reading,
//! timestamps included, so that a record written again is the same points).
//!
//! # Durability
//!
//! In the dead-letter queue each append is written and `fdatasync`ed before it is acknowledged
//! to the caller (the batch is only then let go of), and so is each delete; a new segment's
//! directory entry is synced when the segment is created. A power cut can therefore lose only
//! the record whose append had not returned: its batch was still held in memory by the writer
//! and is counted as not written. Parking is the failure path, so an fsync per record (about a
//! millisecond on SSDs) is cheap next to the sink timeout that led to it.
//!
//! The write-ahead log appends one record per group of messages and syncs it once
//! ([`super::SegLog::sync`]) before any message of the group is acknowledged; its deletes are
//! not synced (a tombstone lost in a power cut writes a record to the sink a second time, the
//! same points).

use std::io::{self, Read, Write};

/// First bytes of `deleted.log`.
pub const DELETED_MAGIC: &[u8; 8] = b"GWDEL001";
/// Bytes before a frame's body.
pub const FRAME_HEADER: usize = 8;
/// A frame body larger than this is damage, not data (batches are far smaller).
pub const MAX_BODY: u32 = 256 * 1024 * 1024;

/// Writes one frame around `body`. Bodies are never empty: an all-zero frame header (length 0,
/// CRC32C of nothing = 0) is what a zero-filled tail looks like, so it must not be valid data.
pub fn write_frame(out: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| (1..=MAX_BODY).contains(l))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "DLQ record too large"))?;
    let mut header = [0u8; FRAME_HEADER];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.write_all(&header)?;
    out.write_all(body)
}

/// What reading one frame found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Body(Vec<u8>),
    /// Clean end of the file.
    End,
    /// Fewer bytes than the frame announces, or an impossible length: a write cut short.
    Torn,
    /// The body does not match its checksum.
    Corrupt,
}

/// Reads the next frame from `input`.
pub fn read_frame(input: &mut impl Read) -> io::Result<Frame> {
    let mut header = [0u8; FRAME_HEADER];
    match read_full(input, &mut header)? {
        0 => return Ok(Frame::End),
        n if n < FRAME_HEADER => return Ok(Frame::Torn),
        _ => {}
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 {
        return Ok(Frame::Corrupt);
    }
    if len > MAX_BODY {
        return Ok(Frame::Torn);
    }
    let mut body = vec![0u8; len as usize];
    if read_full(input, &mut body)? < body.len() {
        return Ok(Frame::Torn);
    }
    if crc32c::crc32c(&body) != crc {
        return Ok(Frame::Corrupt);
    }
    Ok(Frame::Body(body))
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A segment record's body: metadata (JSON) and data.
pub fn encode_record(meta_json: &[u8], data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + meta_json.len() + data.len());
    body.extend_from_slice(&(meta_json.len() as u32).to_le_bytes());
    body.extend_from_slice(meta_json);
    body.extend_from_slice(data);
    body
}

/// Splits a segment record's body into metadata and data; `None` if it is malformed.
pub fn decode_record(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
    let meta = body.get(4..4 + len)?;
    Some((meta, &body[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_recognised() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").expect("write");
        write_frame(&mut buf, b"x").expect("write");
        assert!(
            write_frame(&mut Vec::new(), b"").is_err(),
            "no empty frames"
        );
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).expect("read"),
            Frame::Body(b"hello".to_vec())
        );
        assert_eq!(
            read_frame(&mut r).expect("read"),
            Frame::Body(b"x".to_vec())
        );
        assert_eq!(read_frame(&mut r).expect("read"), Frame::End);
        // A zero-filled tail is damage, not an empty record.
        let mut r = &[0u8; 16][..];
        assert_eq!(read_frame(&mut r).expect("read"), Frame::Corrupt);

        // A torn tail: every strict prefix of a frame.
        for cut in 1..13 {
            // Every strict prefix of the first frame (8 + 5 bytes).
            let mut r = &buf[..cut];
            assert_eq!(
                read_frame(&mut r).expect("read"),
                Frame::Torn,
                "cut at {cut}"
            );
        }
        // A flipped bit in the body or the checksum.
        for at in [4, 8, 12] {
            let mut damaged = buf.clone();
            damaged[at] ^= 0x10;
            let mut r = &damaged[..];
            assert_eq!(
                read_frame(&mut r).expect("read"),
                Frame::Corrupt,
                "flip at {at}"
            );
        }
        // A zeroed length is damage.
        let mut zeroed = buf.clone();
        zeroed[..4].copy_from_slice(&[0; 4]);
        let mut r = &zeroed[..];
        assert_eq!(read_frame(&mut r).expect("read"), Frame::Corrupt);
        // An absurd length is damage, not an allocation.
        let mut huge = buf.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = &huge[..];
        assert_eq!(read_frame(&mut r).expect("read"), Frame::Torn);
    }

    #[test]
    fn record_bodies_split_back() {
        let body = encode_record(br#"{"k":1}"#, b"line 1\n");
        assert_eq!(
            decode_record(&body),
            Some((&br#"{"k":1}"#[..], &b"line 1\n"[..]))
        );
        assert_eq!(decode_record(&[1, 0]), None);
        assert_eq!(decode_record(&[9, 0, 0, 0, b'x']), None);
    }
}
