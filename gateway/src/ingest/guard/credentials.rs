//! Device credentials: a file of `device:hash` lines (argon2 PHC strings or bcrypt), reloaded
//! when it changes, verified off the async threads.
//!
//! A password hash is slow on purpose (tens of milliseconds for argon2's defaults), which a
//! fleet reconnecting at once would pay thousands of times over. So a successful check is
//! remembered: per device, a keyed SHA-256 of the password that passed, valid while that
//! device's hash in the file stays the same. The plain password is never kept.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::{error, info};

/// Why a credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file cannot be read or written: fix the path or its permissions.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line is not `device:hash` with a hash this gateway knows: fix that line.
    #[error("{path} line {line}: {problem}")]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// What a login attempt comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    UnknownDevice,
    WrongPassword,
}

/// A device's stored hash; the string as it appears in the file.
type Hashes = HashMap<String, Arc<str>>;
/// When the file was last modified, and its length: a change in either means reload.
type Stamp = (SystemTime, u64);
type Passed = (Arc<str>, [u8; 32]);

pub struct Credentials {
    path: PathBuf,
    table: RwLock<(Arc<Hashes>, Option<Stamp>)>,
    /// device → (the hash it was checked against, keyed digest of the password that passed).
    passed: Mutex<HashMap<String, Passed>>,
    key: [u8; 32],
    /// Hash checks running at once; the rest wait (one per core is all they can use).
    slots: Semaphore,
}

impl Credentials {
    /// Reads the file; an unusable file is an error at start-up.
    pub fn open(path: &Path) -> Result<Self, CredentialsError> {
        let (hashes, stamp) = read(path)?;
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            path: path.to_owned(),
            table: RwLock::new((Arc::new(hashes), stamp)),
            passed: Mutex::new(HashMap::new()),
            key,
            slots: Semaphore::new(cores),
        })
    }

    pub fn devices(&self) -> usize {
        self.hashes().len()
    }

    fn hashes(&self) -> Arc<Hashes> {
        // A poisoned lock only means a reload panicked mid-swap; the table itself is whole.
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    pub async fn verify(&self, device: &str, password: &[u8]) -> Verdict {
        let Some(hash) = self.hashes().get(device).cloned() else {
            return Verdict::UnknownDevice;
        };
        let digest = self.digest(device, password);
        if let Ok(passed) = self.passed.lock() {
            if let Some((h, d)) = passed.get(device) {
                if Arc::ptr_eq(h, &hash) && *d == digest {
                    return Verdict::Accepted;
                }
            }
        }
        let Ok(_slot) = self.slots.acquire().await else {
            return Verdict::WrongPassword;
        };
        let (stored, given) = (hash.clone(), password.to_vec());
        let ok = tokio::task::spawn_blocking(move || check(&stored, &given))
            .await
            .unwrap_or(false);
        if !ok {
            return Verdict::WrongPassword;
        }
        if let Ok(mut passed) = self.passed.lock() {
            passed.insert(device.to_owned(), (hash, digest));
        }
        Verdict::Accepted
    }

    fn digest(&self, device: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update((device.len() as u64).to_be_bytes());
        h.update(device.as_bytes());
        h.update(password);
        h.finalize().into()
    }

    /// Reads the file again if it changed since the last read. `Ok(Some(n))`: reloaded with
    /// `n` devices; on error the previous table stays in force.
    pub fn reload_if_changed(&self) -> Result<Option<usize>, CredentialsError> {
        let stamp = stamp(&self.path)?;
        let current = self.table.read().unwrap_or_else(PoisonError::into_inner).1;
        if stamp == current {
            return Ok(None);
        }
        let (hashes, stamp) = read(&self.path)?;
        let old = self.hashes();
        // Keep the same Arc for unchanged hashes so that remembered logins stay valid.
        let hashes: Hashes = hashes
            .into_iter()
            .map(|(device, hash)| match old.get(&device) {
                Some(h) if **h == *hash => (device, h.clone()),
                _ => (device, hash),
            })
            .collect();
        let n = hashes.len();
        if let Ok(mut passed) = self.passed.lock() {
            passed.retain(|device, (h, _)| hashes.get(device).is_some_and(|n| Arc::ptr_eq(n, h)));
        }
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = (Arc::new(hashes), stamp);
        Ok(Some(n))
    }

    /// Polls the file every `interval` and reloads it when it changed.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Arc<crate::metrics::Metrics>) {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            match self.reload_if_changed() {
                Ok(Some(n)) => {
                    metrics.credentials_devices.set(n as i64);
                    metrics
                        .credentials_reloads
                        .get_or_create(&crate::metrics::OutcomeLabel { outcome: "ok" })
                        .inc();
                    info!(devices = n, file = %self.path.display(), "device credentials reloaded");
                }
                Ok(None) => {}
                Err(e) => {
                    metrics
                        .credentials_reloads
                        .get_or_create(&crate::metrics::OutcomeLabel { outcome: "error" })
                        .inc();
                    error!(error = %e, "device credentials NOT reloaded; the previous ones stay in force");
                }
            }
        }
    }
}

fn check(stored: &str, password: &[u8]) -> bool {
    if stored.starts_with("$argon2") {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        PasswordHash::new(stored).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(password, &h)
                .is_ok()
        })
    } else {
        bcrypt::verify(password, stored).unwrap_or(false)
    }
}

fn stamp(path: &Path) -> Result<Option<Stamp>, CredentialsError> {
    let meta = std::fs::metadata(path).map_err(|source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(meta.modified().ok().map(|m| (m, meta.len())))
}

type Table = (Hashes, Option<Stamp>);

fn read(path: &Path) -> Result<Table, CredentialsError> {
    // The stamp is taken first: a write that lands while reading shows up at the next poll.
    let stamp = stamp(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok((parse(path, &text)?, stamp))
}

fn parse(path: &Path, text: &str) -> Result<Hashes, CredentialsError> {
    let mut hashes = Hashes::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let problem = |problem: String| CredentialsError::Line {
            path: path.to_owned(),
            line: i + 1,
            problem,
        };
        let (device, hash) = line
            .split_once(':')
            .ok_or_else(|| problem("expected device:hash".into()))?;
        if device.is_empty() {
            return Err(problem("the device name is empty".into()));
        }
        hash_kind(hash).map_err(problem)?;
        if hashes.insert(device.to_owned(), hash.into()).is_some() {
            return Err(problem(format!("device {device:?} appears twice")));
        }
    }
    Ok(hashes)
}

/// Checks that `hash` is a hash this gateway can verify.
fn hash_kind(hash: &str) -> Result<(), String> {
    if hash.starts_with("$argon2") {
        match argon2::password_hash::PasswordHash::new(hash) {
            Ok(h) if h.salt.is_some() && h.hash.is_some() => Ok(()),
            Ok(_) => Err("not a valid argon2 hash: no salt or no hash".into()),
            Err(e) => Err(format!("not a valid argon2 hash: {e}")),
        }
    } else if ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .any(|p| hash.starts_with(p))
    {
        if hash.len() == 60 {
            Ok(())
        } else {
            Err("not a valid bcrypt hash (expected 60 characters)".into())
        }
    } else {
        Err("the hash must be argon2 ($argon2id$…) or bcrypt ($2b$…); create one with `gateway passwd`".into())
    }
}

/// An argon2id hash of `password` with the crate's default (OWASP) parameters.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Sets `device`'s password in the file `path` (created if missing), replacing the file
/// atomically so that a running gateway never reads half of it.
pub fn set_password(path: &Path, device: &str, password: &[u8]) -> Result<(), CredentialsError> {
    let io = |source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    };
    let bad = |problem: String| CredentialsError::Line {
        path: path.to_owned(),
        line: 0,
        problem,
    };
    if device.is_empty() || device.contains([':', '\n', '\r']) {
        return Err(bad(format!(
            "device name {device:?} is empty or has ':' or a line break"
        )));
    }
    let hash = hash_password(password).map_err(bad)?;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    // Refuse to rewrite a file this gateway could not load.
    parse(path, &text)?;
    let mut out = String::with_capacity(text.len() + hash.len() + device.len() + 2);
    let mut replaced = false;
    for line in text.lines() {
        if line
            .trim()
            .split_once(':')
            .is_some_and(|(d, _)| d == device)
        {
            out.push_str(&format!("{device}:{hash}\n"));
            replaced = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !replaced {
        out.push_str(&format!("{device}:{hash}\n"));
    }
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp).map_err(io)?;
        f.write_all(out.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A bcrypt hash of "secret" at cost 4 (the minimum), so that the test is fast.
    fn bcrypt_line(device: &str) -> String {
        format!("{device}:{}", bcrypt::hash("secret", 4).expect("test"))
    }

    #[tokio::test]
    async fn verifies_remembers_and_reloads() {
        let dir = tempfile::tempdir().expect("test");
        let path = dir.path().join("devices");
        std::fs::write(&path, format!("# fleet\n{}\n", bcrypt_line("a"))).expect("test");
        let c = Credentials::open(&path).expect("test");
        assert_eq!(c.verify("a", b"secret").await, Verdict::Accepted);
        assert_eq!(
            c.verify("a", b"secret").await,
            Verdict::Accepted,
            "remembered"
        );
        assert_eq!(c.verify("a", b"wrong").await, Verdict::WrongPassword);
        assert_eq!(c.verify("b", b"secret").await, Verdict::UnknownDevice);
        assert_eq!(c.reload_if_changed().expect("test"), None, "unchanged");

        set_password(&path, "b", b"other").expect("test");
        assert_eq!(c.reload_if_changed().expect("test"), Some(2));
        assert_eq!(
            c.verify("a", b"secret").await,
            Verdict::Accepted,
            "a untouched"
        );
        assert_eq!(c.verify("b", b"other").await, Verdict::Accepted, "argon2");
        set_password(&path, "a", b"new").expect("test");
        c.reload_if_changed().expect("test");
        assert_eq!(
            c.verify("a", b"secret").await,
            Verdict::WrongPassword,
            "a remembered login ends when the hash changes"
        );
        assert_eq!(c.verify("a", b"new").await, Verdict::Accepted);
    }

    #[test]
    fn a_bad_file_names_the_line_and_keeps_the_old_table() {
        let dir = tempfile::tempdir().expect("test");
        let path = dir.path().join("devices");
        std::fs::write(&path, bcrypt_line("a")).expect("test");
        let c = Credentials::open(&path).expect("test");
        for (text, needle) in [
            ("a\n", "expected device:hash"),
            ("a:plaintext\n", "argon2"),
            (":$2b$04$x\n", "empty"),
            ("a:$argon2id$nonsense\n", "not a valid argon2 hash"),
        ] {
            // Force a new stamp: the length differs from the last good file.
            std::fs::write(&path, format!("# {}\n{text}", "x".repeat(text.len()))).expect("test");
            let e = c.reload_if_changed().expect_err("must fail").to_string();
            assert!(e.contains("line 2") && e.contains(needle), "{e}");
            assert_eq!(c.devices(), 1, "the old table stays");
        }
        let twice = format!("{}\n{}\n", bcrypt_line("a"), bcrypt_line("a"));
        std::fs::write(&path, twice).expect("test");
        assert!(c
            .reload_if_changed()
            .expect_err("must fail")
            .to_string()
            .contains("appears twice"));
    }
}
