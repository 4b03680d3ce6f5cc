//! Logs and traces for both FastFusion binaries, set up in one place so the gateway and the
//! worker log and trace alike.
//!
//! * [`init`] installs the process's `tracing` subscriber: a level filter (FASTFUSION_LOGLEVEL,
//!   refined by RUST_LOG), a text or JSON log layer (FASTFUSION_LOGFORMAT), and, when
//!   OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, an OpenTelemetry
//!   layer exporting spans over OTLP/HTTP (protobuf). The exporter reads the standard OTEL_*
//!   variables itself (headers, timeout, OTEL_BSP_* batching); OTEL_SERVICE_NAME overrides the
//!   binary's name. Without an endpoint no exporter exists: spans cost what they cost before.
//! * W3C trace context crosses process boundaries with [`context_from_headers`] (the HTTP request
//!   into the gateway's request span), [`inject_current`] (the gateway's span into a gRPC call's
//!   metadata) and [`context_from_metadata`] (the worker's side), each followed by
//!   [`set_parent`].
//!
//! [`Telemetry`], the value `init` returns, flushes pending spans when dropped: keep it alive
//! until the binary exits.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, message and fields, the current
    /// span's fields under `span` (the gateway's `request_id` among them).
    Json,
}

impl LogFormat {
    /// `text` or `json`, any case.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// Python's level names (the seed used `logging`) and Rust's, any case.
pub fn parse_level(text: &str) -> Option<LevelFilter> {
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

/// What [`init`] needs from the binary.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// `service.name` of exported spans unless OTEL_SERVICE_NAME is set.
    pub service_name: &'static str,
    /// Default level; RUST_LOG directives are added on top.
    pub level: LevelFilter,
    pub format: LogFormat,
    /// Log to stderr rather than stdout.
    pub stderr: bool,
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An OTEL_* variable asks for something this build does not do.
    #[error("invalid {variable}: {message}")]
    Unsupported {
        variable: &'static str,
        message: String,
    },
    #[error("cannot create the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot install the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the span exporter alive; dropping it flushes and stops it.
#[derive(Debug)]
pub struct Telemetry {
    /// `None` when no OTLP endpoint is configured.
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Sends the spans still batched; the process is exiting, so errors can only be told.
            if let Err(error) = provider.shutdown() {
                eprintln!("OpenTelemetry: flushing spans failed: {error}");
            }
        }
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber (once per process) and, when configured, the OTLP exporter.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    let provider = otlp_provider(settings.service_name)?;
    let filter = EnvFilter::builder()
        .with_default_directive(settings.level.into())
        .from_env_lossy();
    let mut layers: Vec<BoxedLayer> = vec![log_layer(settings)];
    if let Some(provider) = &provider {
        let tracer = provider.tracer(settings.service_name);
        layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
    }
    tracing_subscriber::registry()
        .with(layers.with_filter(filter))
        .try_init()?;
    Ok(Telemetry { provider })
}

fn log_layer(settings: &TelemetrySettings) -> BoxedLayer {
    let ansi = !settings.stderr
        && settings.format == LogFormat::Text
        && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let layer = tracing_subscriber::fmt::layer().with_ansi(ansi);
    match (settings.format, settings.stderr) {
        (LogFormat::Text, false) => layer.boxed(),
        (LogFormat::Text, true) => layer.with_writer(std::io::stderr).boxed(),
        // The message beside level and target, not nested under `fields`, so log tools see it;
        // the current span's fields once (`span`), not again in a list of every open span.
        (LogFormat::Json, false) => layer
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .boxed(),
        (LogFormat::Json, true) => layer
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
}

fn env(variable: &str) -> Option<String> {
    std::env::var(variable)
        .ok()
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

/// The OTLP tracer provider, when an endpoint is configured and tracing not switched off.
fn otlp_provider(service_name: &str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    if endpoint.is_none() || disabled {
        return Ok(None);
    }
    for variable in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = env(variable).filter(|p| p != "http/protobuf") {
            return Err(TelemetryError::Unsupported {
                variable,
                message: format!("only http/protobuf is supported, got '{protocol}'"),
            });
        }
    }
    // The builder reads the endpoint, headers, timeout and compression from OTEL_* itself.
    let exporter = SpanExporter::builder().with_http().build()?;
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok(Some(provider))
}

/// The trace context a client sent in `traceparent` / `tracestate` (empty when none or invalid).
pub fn context_from_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderCarrier(headers))
}

/// The trace context the gateway put in a gRPC call's metadata.
pub fn context_from_metadata(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataCarrier(metadata))
}

/// Writes the current span's trace context into outgoing gRPC metadata; nothing when spans are
/// not exported (the current span then has no OpenTelemetry context).
pub fn inject_current(metadata: &mut MetadataMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// Makes `parent` the parent of `span` in exported traces; a no-op when nothing is exported.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    // Fails only when the span is already started in OpenTelemetry's terms, which callers
    // avoid by setting the parent right after creating it; the span then stays a root.
    let _ = span.set_parent(parent);
}

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataCarrier<'a>(&'a MetadataMap);

impl Extractor for MetadataCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => key.as_str(),
                tonic::metadata::KeyRef::Binary(key) => key.as_str(),
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagator keys and values are ASCII by the W3C format; anything else is skipped.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_read_from_headers_and_metadata() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static(TRACEPARENT));
        let from_http = context_from_headers(&headers);
        let from_grpc = context_from_metadata(&MetadataMap::from_headers(headers));
        for context in [from_http, from_grpc] {
            let span = context.span();
            let span_context = span.span_context();
            assert!(span_context.is_remote());
            assert_eq!(
                span_context.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_eq!(span_context.span_id().to_string(), "00f067aa0ba902b7");
        }
    }

    #[test]
    fn a_malformed_traceparent_gives_no_parent() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static("00-zz-01"));
        assert!(!context_from_headers(&headers)
            .span()
            .span_context()
            .is_valid());
    }

    #[test]
    fn names_parse_in_any_case() {
        assert_eq!(LogFormat::parse(" JSON "), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("yaml"), None);
        assert_eq!(parse_level("warning"), Some(LevelFilter::WARN));
        assert_eq!(parse_level("Critical"), Some(LevelFilter::ERROR));
        assert_eq!(parse_level("loud"), None);
    }
}
