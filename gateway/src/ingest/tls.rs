//! TLS to an external broker (`mqtts://`): rustls with the ring provider, the broker checked
//! against `mqtt.ca_file` (or the system's roots), and an optional client certificate.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::IngestError;
use crate::config::MqttConfig;

/// Debian's bundle of the system's trusted roots.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

pub fn client_config(mqtt: &MqttConfig) -> Result<rustls::ClientConfig, IngestError> {
    let ca = if mqtt.ca_file.as_os_str().is_empty() {
        Path::new(SYSTEM_ROOTS)
    } else {
        &mqtt.ca_file
    };
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certificates("mqtt.ca_file", ca)?);
    if added == 0 {
        return Err(IngestError::Tls(format!(
            "mqtt.ca_file: no usable certificate in {}",
            ca.display()
        )));
    }
    // The ring provider, given explicitly: nothing is installed process-wide.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| IngestError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    let (cert, key) = (&mqtt.client_cert_file, &mqtt.client_key_file);
    if cert.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let chain = certificates("mqtt.client_cert_file", cert)?;
    let key = private_key(key)?;
    builder.with_client_auth_cert(chain, key).map_err(|e| {
        IngestError::Tls(format!(
            "mqtt.client_cert_file and mqtt.client_key_file do not go together: {e}"
        ))
    })
}

fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, IngestError> {
    let file = File::open(path)
        .map_err(|e| IngestError::Tls(format!("{key}: cannot open {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IngestError::Tls(format!("{key}: {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(IngestError::Tls(format!(
            "{key}: no PEM certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, IngestError> {
    let file = File::open(path).map_err(|e| {
        IngestError::Tls(format!(
            "mqtt.client_key_file: cannot open {}: {e}",
            path.display()
        ))
    })?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| IngestError::Tls(format!("mqtt.client_key_file: {}: {e}", path.display())))?
        .ok_or_else(|| {
            IngestError::Tls(format!(
                "mqtt.client_key_file: no PEM private key in {}",
                path.display()
            ))
        })
}
