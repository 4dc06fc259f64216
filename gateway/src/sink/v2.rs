//! InfluxDB v2 write API through the `influxdb2` crate.

use super::{gzip_headers, http_client, transport_error, BuildError, SinkError};
use crate::config::SinkConfig;

#[derive(Clone)]
pub struct V2 {
    client: influxdb2::Client,
    org: String,
    bucket: String,
}

impl V2 {
    pub fn new(config: &SinkConfig) -> Result<Self, BuildError> {
        // influxdb2 0.5 has no request timeout of its own and compresses only its DataPoint
        // path: both come from the reqwest client we hand it. Its write_line_protocol takes no
        // headers, so Content-Encoding rides on the client's default headers; this client only
        // ever writes.
        let builder = http_client(config, gzip_headers(config));
        let client = influxdb2::ClientBuilder::with_builder(
            builder,
            config.url.clone(),
            config.org.clone(),
            config.token.expose(),
        )
        .build()
        .map_err(|e| BuildError::Client(e.to_string()))?;
        Ok(Self {
            client,
            org: config.org.clone(),
            bucket: config.bucket.clone(),
        })
    }

    pub async fn write(&self, body: bytes::Bytes) -> Result<(), SinkError> {
        match self
            .client
            .write_line_protocol(&self.org, &self.bucket, body)
            .await
        {
            Ok(()) => Ok(()),
            // influxdb2 does not pass response headers on, so a 429's Retry-After is not seen
            // here; the backoff's own schedule applies instead.
            Err(influxdb2::RequestError::Http { status, text }) => {
                Err(SinkError::from_status(status.as_u16(), text, None))
            }
            Err(influxdb2::RequestError::ReqwestProcessing { source }) => {
                Err(transport_error(&source))
            }
            Err(other) => Err(SinkError::Retryable {
                status: None,
                retry_after: None,
                detail: other.to_string(),
            }),
        }
    }
}
