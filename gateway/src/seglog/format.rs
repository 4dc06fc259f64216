//! The segment log's on-disk format, shared by the dead-letter queue and the write-ahead log.
//!
//! # Design constraints
//!
//! - Appends only: a record, once its bytes and its fsync are done, is never rewritten, so a
//!   crash can damage at most the record being written (the torn tail).
//! - Every record checks itself (its header and its body, each with a CRC32C), so recovery
//!   can tell a torn tail from flipped bits, and keeps every intact record around damage,
//!   without trusting anything else on disk.
//! - Files of the first layout (magic "…001") are still read; new ones are written in the
//!   second ("…002"), and an old segment is never appended to.
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
//! | "GWDLQ002" (DLQ),    |           |           |           |           |
//! | "GWWAL002" (WAL) or  |           |           |           |           |
//! | "GWDEL002" (deleted) |           |           |           |           |
//! +----------------------+-----------+-----------+-----------+-----------+-----
//!
//! record (a frame, version 2; see [`Version`] for why and for version 1, still read):
//! +-------------+-------------+--------------------------+-------------------------+
//! | len: u32 LE | crc: u32 LE | head: u32 LE             | body: `len` bytes       |
//! |             | CRC32C(body)| CRC32C(len ‖ crc) ^ K    |                         |
//! +-------------+-------------+--------------------------+-------------------------+
//!
//! segment record body:                 deleted.log record body:
//! +--------------+--------+--------+   +------------------------------+
//! | meta_len u32 | meta   | data   |   | record id, UTF-8 ("3-4096")  |
//! | LE           | (JSON) | (bytes)|   +------------------------------+
//! +--------------+--------+--------+
//! ```
//!
//! A record's id is `<segment number>-<byte offset of its frame>`: stable for its whole life,
//! and it says where the record is. An id is never given twice, so a tombstone can only ever
//! hide the record it was written for: segment numbers are never reused, and a segment is
//! never appended to after recovery cut its torn tail (a tombstone can outlive an append that a
//! power cut lost; the next record at that offset would otherwise be hidden by it). `meta` is [`super::Meta`] as JSON; `data` is the raw MQTT
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

use std::io;
#[cfg(test)]
use std::io::Write;

/// First bytes of `deleted.log`.
pub const DELETED_MAGIC: &[u8; 8] = b"GWDEL001";
/// Bytes before a frame's body in version 1.
pub const FRAME_HEADER: usize = 8;
/// A frame body larger than this is damage, not data (batches are far smaller).
pub const MAX_BODY: u32 = 256 * 1024 * 1024;

/// Writes one version-1 frame around `body`: what earlier versions wrote (tests build old
/// files with it).
#[cfg(test)]
pub fn write_frame(out: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| (1..=MAX_BODY).contains(l))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "log record too large"))?;
    let mut header = [0u8; FRAME_HEADER];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.write_all(&header)?;
    out.write_all(body)
}

/// The frame layout of a file, named by the last byte of its magic ("…001", "…002").
///
/// Version 1 (above) checks the body only: a flipped bit in a length is indistinguishable
/// from a write cut short, and recovery cannot find the frames after it. Version 2 adds a
/// checksum of the header itself, so that any damaged byte is detected as damage, the length
/// of a frame whose body is damaged is still known (the frames after it are kept), and a
/// damaged header is skipped by finding the next frame whose header and body both check:
///
/// ```text
/// +---------------+---------------+------------------------+------------------+
/// | len: u32 LE   | crc: u32 LE   | head: u32 LE           | body: `len` bytes |
/// |               | CRC32C(body)  | CRC32C(len ‖ crc) ^ K  |                  |
/// +---------------+---------------+------------------------+------------------+
/// ```
///
/// `K` makes an all-zero header fail its check (a zero-filled tail is never a frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Mixed into the header checksum: CRC32C of eight zero bytes is not zero by itself, but a
/// constant keeps a header of any all-equal pattern from checking by accident.
const HEAD_KEY: u32 = 0x5a17_c0de;

impl Version {
    /// Bytes before a frame's body.
    pub fn header_len(self) -> usize {
        match self {
            Version::V1 => FRAME_HEADER,
            Version::V2 => FRAME_HEADER + 4,
        }
    }

    /// The magic of a file of this version, from the version-1 magic of its kind.
    pub fn magic(self, v1: &[u8; 8]) -> [u8; 8] {
        let mut m = *v1;
        m[7] = match self {
            Version::V1 => b'1',
            Version::V2 => b'2',
        };
        m
    }

    /// The version a file's magic names, given the version-1 magic of its kind.
    pub fn of_magic(magic: &[u8], v1: &[u8; 8]) -> Option<Version> {
        [Version::V1, Version::V2]
            .into_iter()
            .find(|v| magic == v.magic(v1))
    }
}

fn head_check(len: u32, crc: u32) -> u32 {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..].copy_from_slice(&crc.to_le_bytes());
    crc32c::crc32c(&h) ^ HEAD_KEY
}

/// Appends one version-2 frame around `body` (never empty, at most [`MAX_BODY`]).
pub fn encode_frame(out: &mut Vec<u8>, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| (1..=MAX_BODY).contains(l))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "log record too large"))?;
    let crc = crc32c::crc32c(body);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&head_check(len, crc).to_le_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// What a scan of a file's frames found. Offsets are from the start of the file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Each intact frame: its offset, and where its body is.
    pub frames: Vec<(u64, std::ops::Range<usize>)>,
    /// Byte ranges that hold damage: a frame that fails its checks, or bytes between two
    /// intact frames that are not a frame.
    pub damaged: Vec<std::ops::Range<u64>>,
    /// Where a torn tail starts (a frame cut short, or zeros to the end): only the last
    /// write can be torn, and it was never acknowledged.
    pub torn_at: Option<u64>,
}

/// Reads every frame of `data` from `start` (just after the magic).
pub fn scan(data: &[u8], start: usize, version: Version) -> Scan {
    let mut out = Scan::default();
    let mut pos = start.min(data.len());
    let end = data.len();
    while pos < end {
        if data[pos..].iter().all(|b| *b == 0) {
            out.torn_at = Some(pos as u64);
            break;
        }
        match frame_at(data, pos, version) {
            At::Frame(body) => {
                out.frames.push((pos as u64, body.clone()));
                pos = body.end;
            }
            At::Short => {
                out.torn_at = Some(pos as u64);
                break;
            }
            At::BadBody(next) => {
                out.damaged.push(pos as u64..next as u64);
                pos = next;
            }
            At::BadHeader => {
                // The length cannot be trusted: find the next frame that checks whole.
                let next = match version {
                    Version::V1 => None,
                    Version::V2 => {
                        (pos + 1..end).find(|&q| matches!(frame_at(data, q, version), At::Frame(_)))
                    }
                };
                let next = next.unwrap_or(end);
                out.damaged.push(pos as u64..next as u64);
                pos = next;
            }
        }
    }
    out
}

enum At {
    Frame(std::ops::Range<usize>),
    /// Fewer bytes than the (checked) header announces: a write cut short.
    Short,
    /// The header checks, the body does not: the next frame starts here.
    BadBody(usize),
    /// The header does not check (or, in version 1, is impossible).
    BadHeader,
}

fn frame_at(data: &[u8], pos: usize, version: Version) -> At {
    let header_len = version.header_len();
    let Some(header) = data.get(pos..pos + header_len) else {
        return At::Short;
    };
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (len, crc) = (word(0), word(4));
    let head_ok = match version {
        // Version 1 cannot tell: an impossible length is all it can see.
        Version::V1 => (1..=MAX_BODY).contains(&len),
        Version::V2 => (1..=MAX_BODY).contains(&len) && word(8) == head_check(len, crc),
    };
    if !head_ok {
        return At::BadHeader;
    }
    let body = pos + header_len..pos + header_len + len as usize;
    let Some(bytes) = data.get(body.clone()) else {
        return At::Short;
    };
    if crc32c::crc32c(bytes) == crc {
        At::Frame(body)
    } else {
        At::BadBody(body.end)
    }
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

    /// A small version-2 file: magic and three frames.
    fn small_log() -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
        let mut data = Version::V2.magic(b"GWTST001").to_vec();
        let mut frames = Vec::new();
        for body in [&b"alpha"[..], b"bravo-bravo", b"c"] {
            frames.push((data.len() as u64, body.to_vec()));
            encode_frame(&mut data, body).expect("encode");
        }
        (data, frames)
    }

    fn bodies(data: &[u8], scan: &Scan) -> Vec<(u64, Vec<u8>)> {
        scan.frames
            .iter()
            .map(|(at, body)| (*at, data[body.clone()].to_vec()))
            .collect()
    }

    #[test]
    fn a_clean_log_scans_whole() {
        let (data, frames) = small_log();
        let s = scan(&data, 8, Version::V2);
        assert_eq!(bodies(&data, &s), frames);
        assert!(s.damaged.is_empty() && s.torn_at.is_none());
        assert_eq!(
            Version::of_magic(&data[..8], b"GWTST001"),
            Some(Version::V2)
        );
        assert_eq!(
            Version::of_magic(b"GWTST001", b"GWTST001"),
            Some(Version::V1)
        );
        assert_eq!(Version::of_magic(b"GWTST009", b"GWTST001"), None);
    }

    /// The damage table (after Vector's `known_errors`): every bit of every byte after the
    /// magic flipped, one at a time, and the file cut at every offset. Recovery must report
    /// the damage (a flip is never taken for a torn tail), lose at most the frame the damage
    /// is in, and never return a frame that was not written, or one at the wrong offset.
    #[test]
    fn every_flipped_bit_and_every_cut_is_found_and_costs_at_most_its_frame() {
        let (data, frames) = small_log();
        let owner = |at: usize| frames.iter().rposition(|(start, _)| *start as usize <= at);
        for at in 8..data.len() {
            for bit in 0..8 {
                let mut damaged = data.clone();
                damaged[at] ^= 1 << bit;
                let s = scan(&damaged, 8, Version::V2);
                let found = bodies(&damaged, &s);
                let hit = owner(at).expect("a frame holds every byte after the magic");
                let expected: Vec<_> = frames
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != hit)
                    .map(|(_, f)| f.clone())
                    .collect();
                assert_eq!(found, expected, "bit {bit} of byte {at}");
                assert!(
                    !s.damaged.is_empty() && s.torn_at.is_none(),
                    "bit {bit} of byte {at}: {s:?}"
                );
            }
        }
        for cut in 8..data.len() {
            let s = scan(&data[..cut], 8, Version::V2);
            let whole: Vec<_> = frames
                .iter()
                .filter(|(start, body)| *start as usize + 12 + body.len() <= cut)
                .cloned()
                .collect();
            assert_eq!(bodies(&data, &s), whole, "cut at {cut}");
            assert!(s.damaged.is_empty(), "cut at {cut}: {s:?}");
            let at_boundary = frames.iter().any(|(start, _)| *start as usize == cut);
            assert_eq!(s.torn_at.is_none(), at_boundary, "cut at {cut}: {s:?}");
        }
        // A zero-filled tail is torn, not damage.
        let mut zeros = data.clone();
        zeros.extend_from_slice(&[0; 40]);
        let s = scan(&zeros, 8, Version::V2);
        assert_eq!(bodies(&zeros, &s), frames);
        assert_eq!(s.torn_at, Some(data.len() as u64));
        assert!(s.damaged.is_empty());
    }

    #[test]
    fn version_1_files_still_read() {
        let mut data = b"GWTST001".to_vec();
        write_frame(&mut data, b"old").expect("write");
        write_frame(&mut data, b"older").expect("write");
        let s = scan(&data, 8, Version::V1);
        assert_eq!(
            bodies(&data, &s),
            vec![(8, b"old".to_vec()), (19, b"older".to_vec())]
        );
        // What version 1 cannot do: a damaged body is skipped by its length, but a damaged
        // length hides the rest.
        let mut damaged = data.clone();
        damaged[8] ^= 0x40;
        let s = scan(&damaged, 8, Version::V1);
        assert!(s.frames.is_empty());
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
