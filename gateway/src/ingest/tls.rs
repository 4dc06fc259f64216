//! TLS with rustls and the ring provider, both ways: to an external broker (`mqtts://`, the
//! broker checked against `mqtt.ca_file` or the system's roots, an optional client
//! certificate), and the embedded broker's TLS listener (`mqtt.tls_listen`, optionally asking
//! devices for certificates signed by `mqtt.tls_client_ca_file`).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::IngestError;
use crate::config::MqttConfig;

pub fn client_config(mqtt: &MqttConfig) -> Result<rustls::ClientConfig, IngestError> {
    let mut roots = rustls::RootCertStore::empty();
    let (ca, certs) = if mqtt.ca_file.as_os_str().is_empty() {
        // The platform's trusted roots, wherever it keeps them; unreadable ones are skipped.
        let found = rustls_native_certs::load_native_certs();
        ("the system's trusted roots".to_owned(), found.certs)
    } else {
        (
            mqtt.ca_file.display().to_string(),
            certificates("mqtt.ca_file", &mqtt.ca_file)?,
        )
    };
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(IngestError::Tls(format!(
            "mqtt.ca_file: no usable certificate in {ca} (set mqtt.ca_file to the broker's CA)"
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
    let key = private_key("mqtt.client_key_file", key)?;
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

fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, IngestError> {
    let file = File::open(path)
        .map_err(|e| IngestError::Tls(format!("{key}: cannot open {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| IngestError::Tls(format!("{key}: {}: {e}", path.display())))?
        .ok_or_else(|| IngestError::Tls(format!("{key}: no PEM private key in {}", path.display())))
}

/// The embedded broker's TLS listener. With `mqtt.tls_client_ca_file`, a device may show a
/// certificate signed by that CA (mutual TLS) instead of a password; its common name is the
/// device's identity. A certificate that does not verify fails the handshake.
pub fn server_config(mqtt: &MqttConfig) -> Result<rustls::ServerConfig, IngestError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| IngestError::Tls(e.to_string()))?;
    let builder = if mqtt.tls_client_ca_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certificates(
            "mqtt.tls_client_ca_file",
            &mqtt.tls_client_ca_file,
        )?);
        if added == 0 {
            return Err(IngestError::Tls(format!(
                "mqtt.tls_client_ca_file: no usable certificate in {}",
                mqtt.tls_client_ca_file.display()
            )));
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                // Devices without a certificate may still log in with a password.
                .allow_unauthenticated()
                .build()
                .map_err(|e| IngestError::Tls(format!("mqtt.tls_client_ca_file: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    };
    let chain = certificates("mqtt.tls_cert_file", &mqtt.tls_cert_file)?;
    let key = private_key("mqtt.tls_key_file", &mqtt.tls_key_file)?;
    builder.with_single_cert(chain, key).map_err(|e| {
        IngestError::Tls(format!(
            "mqtt.tls_cert_file and mqtt.tls_key_file do not go together: {e}"
        ))
    })
}

/// The subject common name of a (verified) device certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or("the certificate has no common name")?;
    name.as_str()
        .map(str::to_owned)
        .map_err(|e| format!("the certificate's common name is not text: {e}"))
}
