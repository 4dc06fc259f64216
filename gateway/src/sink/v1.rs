//! InfluxDB 1.x write API: `POST /write?db=&rp=&precision=ns`.

use std::time::Duration;

use super::{gzip_headers, http_client, transport_error, BuildError, SinkError};
use crate::config::{Secret, SinkConfig};

#[derive(Clone)]
pub struct V1 {
    client: reqwest::Client,
    url: reqwest::Url,
    username: String,
    password: Secret,
}

impl V1 {
    pub fn new(config: &SinkConfig) -> Result<Self, BuildError> {
        let mut url = reqwest::Url::parse(&config.url).map_err(|e| BuildError::Url {
            url: config.url.clone(),
            detail: e.to_string(),
        })?;
        // Keep a path prefix (a sink behind a reverse proxy), unlike influxdb2's set_path.
        let path = format!("{}/write", url.path().trim_end_matches('/'));
        url.set_path(&path);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("db", &config.database);
            if !config.retention_policy.is_empty() {
                q.append_pair("rp", &config.retention_policy);
            }
            q.append_pair("precision", "ns");
        }
        let client = http_client(config, gzip_headers(config))
            .build()
            .map_err(|e| BuildError::Client(e.to_string()))?;
        Ok(Self {
            client,
            url,
            username: config.username.clone(),
            password: config.password.clone(),
        })
    }

    pub async fn write(&self, body: bytes::Bytes) -> Result<(), SinkError> {
        let mut request = self.client.post(self.url.clone()).body(body);
        if !self.username.is_empty() {
            request = request.basic_auth(&self.username, Some(self.password.expose()));
        }
        let response = request.send().await.map_err(|e| transport_error(&e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NO_CONTENT || status == reqwest::StatusCode::OK {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response.text().await.unwrap_or_default();
        Err(SinkError::from_status(status.as_u16(), body, retry_after))
    }
}
