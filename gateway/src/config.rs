//! Gateway settings: compiled defaults < environment < command line (clap), then validated into
//! [`Settings`] at start-up with errors that name the setting.
//!
//! The seed's variables keep their meaning (FASTFUSION_HOST, FASTFUSION_PORT, IMAGE_DATA_PATH,
//! BASE_URL, CONFIG_PATH, FASTFUSION_LOGLEVEL); the rest are new and prefixed FASTFUSION_.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;

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
    /// Directory for images returned as urls; created if missing.
    #[arg(long, env = "IMAGE_DATA_PATH", default_value = "/data")]
    pub image_data_path: PathBuf,
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
    /// A worker's gRPC endpoint, `host:port` or `http://host:port`; repeat for several. None: run
    /// a worker in-process from CONFIG_PATH.
    #[arg(long = "worker", env = "FASTFUSION_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
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
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Host name or address and port to bind.
    pub host: String,
    pub port: u16,
    pub image_data_path: PathBuf,
    /// Without a trailing slash.
    pub base_url: Option<String>,
    pub config_path: PathBuf,
    pub log_level: LevelFilter,
    /// Normalised to `http(s)://host:port`; empty means the embedded worker.
    pub workers: Vec<String>,
    pub max_body_bytes: usize,
    pub max_input_pixels: u64,
    pub request_timeout: Duration,
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
        let log_level = parse_log_level(&self.log_level).ok_or_else(|| {
            error(
                "FASTFUSION_LOGLEVEL (--log-level)",
                format!(
                    "must be one of TRACE, DEBUG, INFO, WARNING, ERROR, got '{}'",
                    self.log_level
                ),
            )
        })?;
        let workers = self
            .workers
            .iter()
            .map(|w| w.trim())
            .filter(|w| !w.is_empty())
            .map(normalize_endpoint)
            .collect::<Result<Vec<_>, _>>()?;
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
        Ok(Settings {
            host,
            port: self.port,
            image_data_path: self.image_data_path,
            base_url,
            config_path: self.config_path,
            log_level,
            workers,
            max_body_bytes: self.max_body_bytes,
            max_input_pixels: self.max_input_pixels,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
        })
    }
}

/// Python's level names (the seed used `logging`) and Rust's.
fn parse_log_level(text: &str) -> Option<LevelFilter> {
    match text.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Some(LevelFilter::TRACE),
        "DEBUG" => Some(LevelFilter::DEBUG),
        "INFO" => Some(LevelFilter::INFO),
        "WARN" | "WARNING" => Some(LevelFilter::WARN),
        "ERROR" | "CRITICAL" | "FATAL" => Some(LevelFilter::ERROR),
        "OFF" => Some(LevelFilter::OFF),
        _ => None,
    }
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
    fn empty_base_url_means_unset() {
        assert_eq!(parse(&["--base-url", ""]).expect("valid").base_url, None);
    }
}
