//! The segment log's recovery over arbitrary files: never a panic, frames only where their
//! checks hold, in order and within the file; and a log directory holding such a file opens
//! (read-only) and reads back every record it lists.
#![no_main]

use gateway::seglog::format::{self, Version};
use gateway::seglog::log::SegLog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, data)) = input.split_first() else {
        return;
    };
    for version in [Version::V1, Version::V2] {
        let scan = format::scan(data, 8.min(data.len()), version);
        let mut end = 8usize.min(data.len());
        for (at, body) in &scan.frames {
            assert!(*at as usize >= end && body.start > *at as usize && body.end <= data.len());
            end = body.end;
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let version = if selector % 2 == 0 {
        Version::V1
    } else {
        Version::V2
    };
    let mut file = version.magic(gateway::dlq::SEGMENT_MAGIC).to_vec();
    file.extend_from_slice(data);
    std::fs::write(dir.path().join("00000000000000000001.seg"), &file).expect("write");
    let options = gateway::dlq::options_for(1 << 30, 1 << 20);
    if let Ok((log, _)) = SegLog::open(dir.path(), options, false) {
        let ids: Vec<String> = log.entries().map(|e| e.id.clone()).collect();
        for id in ids {
            log.read(&id).expect("a listed record reads back");
        }
    }
});
