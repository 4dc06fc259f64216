//! How devices reach the broker: credentials and TLS, read once for the whole fleet.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Broker;

/// What every device's connection shares.
#[derive(Clone)]
pub struct Access {
    pub credentials: Option<(String, String)>,
    /// `None`: plain TCP.
    pub transport: Option<Transport>,
}

impl std::fmt::Debug for Access {
    // The password stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .field("tls", &self.transport.is_some())
            .finish()
    }
}

impl Access {
    pub fn new(b: &Broker) -> Result<Access> {
        let credentials = if b.username.is_empty() {
            None
        } else {
            let password = if b.password_file.as_os_str().is_empty() {
                b.password.clone()
            } else {
                let text = std::fs::read_to_string(&b.password_file).with_context(|| {
                    format!("reading broker.password_file {}", b.password_file.display())
                })?;
                text.trim_end_matches(['\r', '\n']).to_owned()
            };
            Some((b.username.clone(), password))
        };
        let transport = if b.tls {
            Some(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(client_config(b)?),
            )))
        } else {
            None
        };
        Ok(Access {
            credentials,
            transport,
        })
    }
}

fn client_config(b: &Broker) -> Result<rustls::ClientConfig> {
    let (ca, certs) = if b.ca_file.as_os_str().is_empty() {
        // The platform's trusted roots, wherever it keeps them; unreadable ones are skipped.
        let found = rustls_native_certs::load_native_certs();
        ("the system's trusted roots".to_owned(), found.certs)
    } else {
        (
            b.ca_file.display().to_string(),
            read_certs(&b.ca_file).context("broker.ca_file (--ca-file)")?,
        )
    };
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        bail!("broker.ca_file (--ca-file): no usable certificate in {ca}");
    }
    // The ring provider, given explicitly rather than installed process-wide.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots);
    let cert = !b.client_cert.as_os_str().is_empty();
    let key = !b.client_key.as_os_str().is_empty();
    Ok(match (cert, key) {
        (false, false) => builder.with_no_client_auth(),
        (true, true) => {
            let chain = read_certs(&b.client_cert).context("broker.client_cert (--client-cert)")?;
            let key = read_key(&b.client_key).context("broker.client_key (--client-key)")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the client certificate and key do not go together")?
        }
        _ => bail!("broker.client_cert and broker.client_key go together: set both or neither"),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading PEM certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("no PEM certificate in {}", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .with_context(|| format!("reading a PEM private key from {}", path.display()))?
        .with_context(|| format!("no PEM private key in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use serde_json::json;

    fn broker(v: serde_json::Value) -> Broker {
        Settings::load(None, json!({ "broker": v }))
            .expect("settings")
            .broker
    }

    #[test]
    fn credentials_from_a_file_lose_the_newline_and_stay_out_of_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").expect("write");
        let a = Access::new(&broker(json!({"username": "dev", "password_file": file})))
            .expect("access");
        assert_eq!(a.credentials, Some(("dev".into(), "s3cret".into())));
        assert!(!format!("{a:?}").contains("s3cret"));
        let none = Access::new(&broker(json!({}))).expect("access");
        assert!(none.credentials.is_none() && none.transport.is_none());
    }

    #[test]
    fn tls_errors_name_the_key() {
        let err = |v| format!("{:#}", Access::new(&broker(v)).expect_err("refused"));
        assert!(err(json!({"tls": true, "ca_file": "/nonexistent.pem"})).contains("broker.ca_file"));
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        assert!(err(json!({"tls": true, "ca_file": empty})).contains("no PEM certificate"));
    }

    #[test]
    fn the_system_roots_make_a_tls_transport() {
        let a = Access::new(&broker(json!({"tls": true}))).expect("access");
        assert!(a.transport.is_some());
    }
}
