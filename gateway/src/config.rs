//! Gateway settings: compiled defaults < environment < command line (clap), then validated into
//! [`Settings`] at start-up with errors that name the setting.
//!
//! The seed's variables keep their meaning (FASTFUSION_HOST, FASTFUSION_PORT, IMAGE_DATA_PATH,
//! BASE_URL, CONFIG_PATH, FASTFUSION_LOGLEVEL); the rest are new and prefixed FASTFUSION_.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

use crate::storage::StorageLocation;

/// The command line and environment, as given.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fastfusion-gateway",
    version,
    about = "The OpenAI Images API in front of FastFusion workers"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "FASTFUSION_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the log line `listening on http://ADDR` shows it).
    #[arg(long, env = "FASTFUSION_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Where images returned as urls are stored: a directory (created if missing) or an
    /// S3-compatible bucket, `s3://bucket/prefix` (AWS_REGION, AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY as usual).
    #[arg(long, env = "IMAGE_DATA_PATH", default_value = "/data")]
    pub image_data_path: String,
    /// Public base of image urls (e.g. https://example.com/fastfusion). Unset: urls follow the
    /// request's Host / X-Forwarded-Host and X-Forwarded-Proto headers.
    #[arg(long, env = "BASE_URL")]
    pub base_url: Option<String>,
    /// model_config.json for the embedded worker (used when no --worker is given).
    #[arg(long, env = "CONFIG_PATH", default_value = "model_config.json")]
    pub config_path: PathBuf,
    /// Log level: TRACE, DEBUG, INFO, WARNING (or WARN), ERROR (or CRITICAL).
    #[arg(long, env = "FASTFUSION_LOGLEVEL", default_value = "INFO")]
    pub log_level: String,
    /// Log lines as `text` or `json` (one object per line, span fields such as request_id
    /// included). Traces go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (see the README).
    #[arg(long, env = "FASTFUSION_LOGFORMAT", default_value = "text")]
    pub log_format: String,
    /// A worker's gRPC endpoint, `host:port` or `http://host:port`; repeat for several. None: run
    /// a worker in-process from CONFIG_PATH.
    #[arg(long = "worker", env = "FASTFUSION_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// `ALIAS=MODEL`: requests for ALIAS (e.g. `dall-e-3`) go to the served MODEL; repeat, or
    /// comma-separate in the environment.
    #[arg(
        long = "model-alias",
        env = "FASTFUSION_MODEL_ALIASES",
        value_delimiter = ','
    )]
    pub model_aliases: Vec<String>,
    /// The model for requests that name none. Unset: the first worker's model.
    #[arg(long, env = "FASTFUSION_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Seconds between two lookups of worker host names (replicas behind a DNS name that came
    /// or went are picked up).
    #[arg(long, env = "FASTFUSION_DNS_REFRESH_SECS", default_value_t = 10)]
    pub dns_refresh_secs: u64,
    /// Most other workers a request is sent to when one is full, unavailable or unreachable
    /// before producing an image.
    #[arg(long, env = "FASTFUSION_WORKER_RETRIES", default_value_t = 3)]
    pub worker_retries: u32,
    /// Largest request body accepted, in bytes (larger: 413).
    #[arg(long, env = "FASTFUSION_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most pixels (width x height) an uploaded input image or mask may declare; larger: 400.
    /// Checked from the file's header before decoding, against decompression bombs.
    #[arg(long, env = "FASTFUSION_MAX_INPUT_PIXELS", default_value_t = 4096 * 4096)]
    pub max_input_pixels: u64,
    /// Longest a generation request may take, queueing included, in seconds (longer: 503).
    #[arg(long, env = "FASTFUSION_REQUEST_TIMEOUT_SECS", default_value_t = 600)]
    pub request_timeout_secs: u64,
    /// Stored images older than this many seconds are deleted; 0 keeps them forever.
    #[arg(long, env = "FASTFUSION_IMAGE_TTL_SECS", default_value_t = 3600)]
    pub image_ttl_secs: u64,
    /// Seconds between two sweeps for images older than FASTFUSION_IMAGE_TTL_SECS.
    #[arg(long, env = "FASTFUSION_SWEEP_INTERVAL_SECS", default_value_t = 60)]
    pub sweep_interval_secs: u64,
    /// API keys clients must send as `Authorization: Bearer KEY`, comma-separated. With no keys
    /// here or in FASTFUSION_API_KEYS_FILE, the API is open.
    #[arg(long, env = "FASTFUSION_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// A file of API keys, one per line (lines starting with # are comments); adds to
    /// FASTFUSION_API_KEYS.
    #[arg(long, env = "FASTFUSION_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Secret (at least 16 characters) that signs image urls with an expiry
    /// (`?expires=UNIX&sig=HEX`). Unset: urls are unsigned, unguessable and open.
    #[arg(long, env = "FASTFUSION_URL_SIGNING_KEY", hide_env_values = true)]
    pub url_signing_key: Option<String>,
    /// Seconds a signed image url stays valid.
    #[arg(long, env = "FASTFUSION_URL_TTL_SECS", default_value_t = 3600)]
    pub url_ttl_secs: u64,
    /// Most generation requests (generations, edits, variations) this gateway runs at once;
    /// beyond that: 429 at once. 0: no limit.
    #[arg(
        long,
        env = "FASTFUSION_MAX_CONCURRENT_REQUESTS",
        default_value_t = 128
    )]
    pub max_concurrent_requests: usize,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Host name or address and port to bind.
    pub host: String,
    pub port: u16,
    pub image_data_path: StorageLocation,
    /// Without a trailing slash.
    pub base_url: Option<String>,
    pub config_path: PathBuf,
    pub log_level: LevelFilter,
    pub log_format: fastfusion_telemetry::LogFormat,
    /// Normalised to `http(s)://host:port`; empty means the embedded worker.
    pub workers: Vec<String>,
    /// Aliases and the default model.
    pub model_routing: crate::workers::ModelRouting,
    pub dns_refresh: Duration,
    pub worker_retries: u32,
    pub max_body_bytes: usize,
    pub max_input_pixels: u64,
    pub request_timeout: Duration,
    /// Age after which stored images are deleted; `None`: never.
    pub image_ttl: Option<Duration>,
    pub sweep_interval: Duration,
    /// Keys accepted as `Authorization: Bearer KEY`; empty: no authentication.
    pub api_keys: Vec<Secret>,
    /// `None`: image urls are not signed.
    pub url_signing_key: Option<Secret>,
    pub url_ttl: Duration,
    /// `None`: no limit.
    pub max_concurrent_requests: Option<usize>,
}

/// A secret setting (API key, signing key): used and compared, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A setting with an unusable value.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid {setting}: {message}")]
pub struct ConfigError {
    /// The environment variable and flag, e.g. `BASE_URL (--base-url)`.
    pub setting: &'static str,
    pub message: String,
}

fn error(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        message: message.into(),
    }
}

impl Args {
    /// Checks every value; the first bad one is reported by name.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let host = self.host.trim().to_string();
        if host.is_empty() {
            return Err(error("FASTFUSION_HOST (--host)", "must not be empty"));
        }
        let base_url = match self.base_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"));
                match rest {
                    Some(rest) if !rest.trim_end_matches('/').is_empty() => {
                        Some(url.trim_end_matches('/').to_string())
                    }
                    _ => {
                        return Err(error(
                            "BASE_URL (--base-url)",
                            format!("must be an http:// or https:// url with a host, got '{url}'"),
                        ))
                    }
                }
            }
        };
        let log_level = fastfusion_telemetry::parse_level(&self.log_level).ok_or_else(|| {
            error(
                "FASTFUSION_LOGLEVEL (--log-level)",
                format!(
                    "must be one of TRACE, DEBUG, INFO, WARNING, ERROR, got '{}'",
                    self.log_level
                ),
            )
        })?;
        let log_format =
            fastfusion_telemetry::LogFormat::parse(&self.log_format).ok_or_else(|| {
                error(
                    "FASTFUSION_LOGFORMAT (--log-format)",
                    format!("must be text or json, got '{}'", self.log_format),
                )
            })?;
        let workers = self
            .workers
            .iter()
            .map(|w| w.trim())
            .filter(|w| !w.is_empty())
            .map(normalize_endpoint)
            .collect::<Result<Vec<_>, _>>()?;
        let model_routing = model_routing(&self.model_aliases, self.default_model.as_deref())?;
        if self.dns_refresh_secs == 0 {
            return Err(error(
                "FASTFUSION_DNS_REFRESH_SECS (--dns-refresh-secs)",
                "must be greater than 0",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(error(
                "FASTFUSION_MAX_BODY_BYTES (--max-body-bytes)",
                "must be greater than 0",
            ));
        }
        if self.max_input_pixels == 0 {
            return Err(error(
                "FASTFUSION_MAX_INPUT_PIXELS (--max-input-pixels)",
                "must be greater than 0",
            ));
        }
        if self.request_timeout_secs == 0 {
            return Err(error(
                "FASTFUSION_REQUEST_TIMEOUT_SECS (--request-timeout-secs)",
                "must be greater than 0",
            ));
        }
        let image_data_path = StorageLocation::parse(&self.image_data_path)
            .map_err(|message| error("IMAGE_DATA_PATH (--image-data-path)", message))?;
        if self.sweep_interval_secs == 0 {
            return Err(error(
                "FASTFUSION_SWEEP_INTERVAL_SECS (--sweep-interval-secs)",
                "must be greater than 0",
            ));
        }
        let mut api_keys = match self.api_keys.as_deref() {
            Some(list) => parse_keys(list.split(','), "FASTFUSION_API_KEYS (--api-keys)")?,
            None => Vec::new(),
        };
        if let Some(path) = &self.api_keys_file {
            api_keys.extend(read_key_file(path)?);
        }
        const SIGNING_KEY: &str = "FASTFUSION_URL_SIGNING_KEY (--url-signing-key)";
        let url_signing_key = match self.url_signing_key.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(key) if key.len() < MIN_SIGNING_KEY_LEN => {
                return Err(error(
                    SIGNING_KEY,
                    format!("must be at least {MIN_SIGNING_KEY_LEN} characters long"),
                ))
            }
            Some(key) => Some(Secret::new(key)),
        };
        if self.url_ttl_secs == 0 {
            return Err(error(
                "FASTFUSION_URL_TTL_SECS (--url-ttl-secs)",
                "must be greater than 0",
            ));
        }
        Ok(Settings {
            host,
            port: self.port,
            image_data_path,
            base_url,
            config_path: self.config_path,
            log_level,
            log_format,
            workers,
            model_routing,
            dns_refresh: Duration::from_secs(self.dns_refresh_secs),
            worker_retries: self.worker_retries,
            max_body_bytes: self.max_body_bytes,
            max_input_pixels: self.max_input_pixels,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            image_ttl: (self.image_ttl_secs > 0).then(|| Duration::from_secs(self.image_ttl_secs)),
            sweep_interval: Duration::from_secs(self.sweep_interval_secs),
            api_keys,
            url_signing_key,
            url_ttl: Duration::from_secs(self.url_ttl_secs),
            max_concurrent_requests: (self.max_concurrent_requests > 0)
                .then_some(self.max_concurrent_requests),
        })
    }
}

/// Shortest FASTFUSION_URL_SIGNING_KEY accepted: a short secret could be found by trying.
const MIN_SIGNING_KEY_LEN: usize = 16;

/// Trimmed, non-empty keys; a key with whitespace inside could never be sent as a Bearer token.
fn parse_keys<'a>(
    keys: impl Iterator<Item = &'a str>,
    setting: &'static str,
) -> Result<Vec<Secret>, ConfigError> {
    keys.map(str::trim)
        .filter(|key| !key.is_empty())
        .map(|key| {
            if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(error(setting, "an API key contains whitespace"))
            } else {
                Ok(Secret::new(key))
            }
        })
        .collect()
}

/// The keys in FASTFUSION_API_KEYS_FILE: one per line, `#` lines are comments. A file with no
/// key is an error: it would leave the API open while its operator believes it closed.
fn read_key_file(path: &Path) -> Result<Vec<Secret>, ConfigError> {
    const SETTING: &str = "FASTFUSION_API_KEYS_FILE (--api-keys-file)";
    let text = std::fs::read_to_string(path)
        .map_err(|e| error(SETTING, format!("cannot read {}: {e}", path.display())))?;
    let lines = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'));
    let keys = parse_keys(lines, SETTING)?;
    if keys.is_empty() {
        return Err(error(
            SETTING,
            format!("{} contains no API key", path.display()),
        ));
    }
    Ok(keys)
}

/// `host:port` → `http://host:port`; an explicit http(s) scheme is kept. The port is required:
/// workers have no conventional one.
fn normalize_endpoint(endpoint: &str) -> Result<String, ConfigError> {
    const SETTING: &str = "FASTFUSION_WORKERS (--worker)";
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let uri: axum::http::Uri = url.parse().map_err(|e| {
        error(
            SETTING,
            format!("'{endpoint}' is not a valid endpoint: {e}"),
        )
    })?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    let has_port = uri.authority().and_then(|a| a.port_u16()).is_some();
    let bare = uri.path() == "/" || uri.path().is_empty();
    if !scheme_ok || !has_port || !bare {
        return Err(error(
            SETTING,
            format!("'{endpoint}' must be host:port or http(s)://host:port"),
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// `ALIAS=MODEL` pairs and the default model; an alias may not be given twice.
fn model_routing(
    aliases: &[String],
    default_model: Option<&str>,
) -> Result<crate::workers::ModelRouting, ConfigError> {
    const SETTING: &str = "FASTFUSION_MODEL_ALIASES (--model-alias)";
    let mut routing = crate::workers::ModelRouting {
        default_model: default_model
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_string),
        ..Default::default()
    };
    for pair in aliases.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
        let parsed = pair
            .split_once('=')
            .map(|(alias, model)| (alias.trim(), model.trim()))
            .filter(|(alias, model)| !alias.is_empty() && !model.is_empty());
        let Some((alias, model)) = parsed else {
            return Err(error(SETTING, format!("'{pair}' must be ALIAS=MODEL")));
        };
        if routing
            .aliases
            .insert(alias.to_string(), model.to_string())
            .is_some()
        {
            return Err(error(SETTING, format!("alias '{alias}' is given twice")));
        }
    }
    Ok(routing)
}

impl Settings {
    /// `host:port` for binding; host names are resolved when binding.
    pub fn bind_address(&self) -> String {
        match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, self.port).to_string(),
            Err(_) => format!("{}:{}", self.host, self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Settings, ConfigError> {
        let mut argv = vec!["fastfusion-gateway"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv).expect("parses").validate()
    }

    #[test]
    fn environment_names_are_the_seeds() {
        let command = Args::command();
        let env_of = |id: &str| {
            command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env_of("host").as_deref(), Some("FASTFUSION_HOST"));
        assert_eq!(env_of("port").as_deref(), Some("FASTFUSION_PORT"));
        assert_eq!(
            env_of("image_data_path").as_deref(),
            Some("IMAGE_DATA_PATH")
        );
        assert_eq!(env_of("base_url").as_deref(), Some("BASE_URL"));
        assert_eq!(env_of("config_path").as_deref(), Some("CONFIG_PATH"));
        assert_eq!(env_of("log_level").as_deref(), Some("FASTFUSION_LOGLEVEL"));
        assert_eq!(env_of("workers").as_deref(), Some("FASTFUSION_WORKERS"));
    }

    #[test]
    fn command_line_values_validate() {
        let settings = parse(&[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--base-url",
            "https://img.example/ff/",
            "--log-level",
            "warning",
            "--worker",
            "w1:50051",
            "--worker",
            "https://w2:443,w3:7",
            "--request-timeout-secs",
            "30",
        ])
        .expect("valid");
        assert_eq!(settings.bind_address(), "127.0.0.1:0");
        assert_eq!(settings.base_url.as_deref(), Some("https://img.example/ff"));
        assert_eq!(settings.log_level, LevelFilter::WARN);
        assert_eq!(
            settings.workers,
            vec!["http://w1:50051", "https://w2:443", "http://w3:7"]
        );
        assert_eq!(settings.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let setting_of = |args: &[&str]| parse(args).map(|_| ()).expect_err("invalid").setting;
        assert_eq!(
            setting_of(&["--base-url", "example.com"]),
            "BASE_URL (--base-url)"
        );
        assert_eq!(
            setting_of(&["--base-url", "https://"]),
            "BASE_URL (--base-url)"
        );
        assert_eq!(
            setting_of(&["--log-level", "LOUD"]),
            "FASTFUSION_LOGLEVEL (--log-level)"
        );
        assert_eq!(
            setting_of(&["--log-format", "yaml"]),
            "FASTFUSION_LOGFORMAT (--log-format)"
        );
        for worker in ["w1", "ftp://w1:1", "w1:port", "http://w1:1/path"] {
            assert_eq!(
                setting_of(&["--worker", worker]),
                "FASTFUSION_WORKERS (--worker)",
                "{worker}"
            );
        }
        assert_eq!(setting_of(&["--host", " "]), "FASTFUSION_HOST (--host)");
        assert_eq!(
            setting_of(&["--max-body-bytes", "0"]),
            "FASTFUSION_MAX_BODY_BYTES (--max-body-bytes)"
        );
        assert_eq!(
            setting_of(&["--max-input-pixels", "0"]),
            "FASTFUSION_MAX_INPUT_PIXELS (--max-input-pixels)"
        );
    }

    #[test]
    fn access_and_storage_settings_validate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys");
        std::fs::write(
            &file,
            "# team A\nkey-from-file\n\n  # old: revoked\n second-key \n",
        )
        .expect("write");
        let settings = parse(&[
            "--image-data-path",
            "s3://bucket/ff",
            "--image-ttl-secs",
            "0",
            "--api-keys",
            " sk-one, ,sk-two",
            "--api-keys-file",
            file.to_str().expect("utf-8 path"),
            "--url-signing-key",
            "0123456789abcdef",
            "--max-concurrent-requests",
            "0",
        ])
        .expect("valid");
        assert_eq!(settings.image_data_path.to_string(), "s3://bucket/ff");
        assert_eq!(settings.image_ttl, None);
        let keys: Vec<&str> = settings.api_keys.iter().map(Secret::expose).collect();
        assert_eq!(keys, ["sk-one", "sk-two", "key-from-file", "second-key"]);
        assert!(settings.url_signing_key.is_some());
        assert_eq!(settings.max_concurrent_requests, None);
        // Secrets stay out of logs.
        let debug = format!("{settings:?}");
        assert!(
            !debug.contains("sk-one") && !debug.contains("0123456789abcdef"),
            "{debug}"
        );

        let defaults = parse(&[]).expect("valid");
        assert_eq!(
            defaults.image_data_path,
            StorageLocation::Directory("/data".into())
        );
        assert_eq!(defaults.image_ttl, Some(Duration::from_secs(3600)));
        assert_eq!(defaults.sweep_interval, Duration::from_secs(60));
        assert!(defaults.api_keys.is_empty());
        assert_eq!(defaults.url_signing_key, None);
        assert_eq!(defaults.url_ttl, Duration::from_secs(3600));
        assert_eq!(defaults.max_concurrent_requests, Some(128));

        let setting_of = |args: &[&str]| parse(args).map(|_| ()).expect_err("invalid").setting;
        assert_eq!(
            setting_of(&["--image-data-path", "gs://bucket/x"]),
            "IMAGE_DATA_PATH (--image-data-path)"
        );
        assert_eq!(
            setting_of(&["--sweep-interval-secs", "0"]),
            "FASTFUSION_SWEEP_INTERVAL_SECS (--sweep-interval-secs)"
        );
        assert_eq!(
            setting_of(&["--url-signing-key", "short"]),
            "FASTFUSION_URL_SIGNING_KEY (--url-signing-key)"
        );
        assert_eq!(
            setting_of(&["--url-ttl-secs", "0"]),
            "FASTFUSION_URL_TTL_SECS (--url-ttl-secs)"
        );
        assert_eq!(
            setting_of(&["--api-keys", "a b"]),
            "FASTFUSION_API_KEYS (--api-keys)"
        );
        let comments_only = dir.path().join("empty");
        std::fs::write(&comments_only, "# nothing yet\n").expect("write");
        for path in [comments_only, dir.path().join("missing")] {
            assert_eq!(
                setting_of(&["--api-keys-file", path.to_str().expect("utf-8 path")]),
                "FASTFUSION_API_KEYS_FILE (--api-keys-file)"
            );
        }
    }

    #[test]
    fn empty_base_url_means_unset() {
        assert_eq!(parse(&["--base-url", ""]).expect("valid").base_url, None);
    }

    #[test]
    fn model_aliases_default_model_and_discovery_settings() {
        let settings = parse(&[
            "--model-alias",
            "dall-e-3=sd-turbo, dall-e-2 = sd15",
            "--model-alias",
            "gpt-image-1=sd-turbo",
            "--default-model",
            "sd15",
            "--dns-refresh-secs",
            "3",
            "--worker-retries",
            "1",
        ])
        .expect("valid");
        let aliases: Vec<(&str, &str)> = settings
            .model_routing
            .aliases
            .iter()
            .map(|(a, m)| (a.as_str(), m.as_str()))
            .collect();
        assert_eq!(
            aliases,
            vec![
                ("dall-e-2", "sd15"),
                ("dall-e-3", "sd-turbo"),
                ("gpt-image-1", "sd-turbo")
            ]
        );
        assert_eq!(
            settings.model_routing.default_model.as_deref(),
            Some("sd15")
        );
        assert_eq!(settings.dns_refresh, Duration::from_secs(3));
        assert_eq!(settings.worker_retries, 1);

        let setting_of = |args: &[&str]| parse(args).map(|_| ()).expect_err("invalid").setting;
        for bad in ["dall-e-3", "=sd", "dall-e-3=", "a=b,a=c"] {
            assert_eq!(
                setting_of(&["--model-alias", bad]),
                "FASTFUSION_MODEL_ALIASES (--model-alias)",
                "{bad}"
            );
        }
        assert_eq!(
            setting_of(&["--dns-refresh-secs", "0"]),
            "FASTFUSION_DNS_REFRESH_SECS (--dns-refresh-secs)"
        );
    }
}
