//! Observability end to end: a gateway and a separate worker process export spans over OTLP/HTTP
//! to a receiver started here; a request carrying a W3C `traceparent` must yield a gateway span
//! and a worker span in the client's trace, the worker's a child of the gateway's. Both processes
//! log JSON lines (FASTFUSION_LOGFORMAT=json) that carry the request id.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use axum::body::Bytes;
use axum::http::{header, StatusCode};
use fastfusion_tests::{binary, wait_http_ok, write_tiny_config, Process};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use reqwest::blocking::Client;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(60);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";
const REQUEST_ID: &str = "observability-test-1";

/// One exported span, as the receiver decoded it.
#[derive(Debug, Clone)]
struct SpanRecord {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// An OTLP/HTTP (protobuf) trace receiver on a loopback port.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    /// Serves the receiver; dropped (and stopped) with it.
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start() -> Result<Receiver> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr: SocketAddr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let store = Arc::clone(&store);
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return otlp_reply(StatusCode::BAD_REQUEST);
                    };
                    if let Ok(mut spans) = store.lock() {
                        spans.extend(records(request));
                    }
                    otlp_reply(StatusCode::OK)
                }
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await });
        Ok(Receiver {
            endpoint: format!("http://{addr}"),
            spans,
            _runtime: runtime,
        })
    }

    /// Waits until spans of `trace_id` from both services have arrived.
    fn wait_trace(&self, trace_id: &str, timeout: Duration) -> Result<Vec<SpanRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let trace: Vec<SpanRecord> = self
                .spans
                .lock()
                .map_err(|_| anyhow::anyhow!("receiver lock poisoned"))?
                .iter()
                .filter(|span| span.trace_id == trace_id)
                .cloned()
                .collect();
            let from = |service: &str| trace.iter().any(|span| span.service == service);
            if from("fastfusion-gateway") && from("fastfusion-worker") {
                return Ok(trace);
            }
            ensure!(
                Instant::now() < deadline,
                "spans of trace {trace_id} from both services did not arrive; got {trace:?}; all: {:?}",
                self.spans.lock().map(|s| s.clone()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An empty protobuf body is a valid `ExportTraceServiceResponse`.
fn otlp_reply(status: StatusCode) -> (StatusCode, [(header::HeaderName, &'static str); 1]) {
    (status, [(header::CONTENT_TYPE, "application/x-protobuf")])
}

fn records(request: ExportTraceServiceRequest) -> Vec<SpanRecord> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|attribute| attribute.key == "service.name")
            .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
            .map(|value| match value {
                AnyValue::StringValue(name) => name.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                out.push(SpanRecord {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(span.trace_id),
                    span_id: hex::encode(span.span_id),
                    parent_span_id: hex::encode(span.parent_span_id),
                });
            }
        }
    }
    out
}

/// The output lines that are JSON objects; panics on any other line, since JSON mode must
/// print nothing else.
fn json_lines(output: &str) -> Vec<Value> {
    output
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"))
        })
        .collect()
}

#[test]
fn traces_cross_gateway_and_worker_and_logs_are_json() -> Result<()> {
    let receiver = Receiver::start()?;
    let telemetry = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        // Export within 100 ms rather than the default 5 s, so the test is quick.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("FASTFUSION_LOGFORMAT", "json"),
    ];
    let dir = tempfile::tempdir()?;
    let config = write_tiny_config(dir.path(), json!({}))?;
    let config_s = config.display().to_string();
    let mut worker = Process::spawn(
        &binary("fastfusion-worker")?,
        &["serve", "--config", &config_s, "--listen", "127.0.0.1:0"],
        &telemetry,
    )?;
    let worker_addr = worker.wait_listening(START)?;

    let data_s = dir.path().join("data").display().to_string();
    let mut envs = vec![
        ("CONFIG_PATH", config_s.as_str()),
        ("IMAGE_DATA_PATH", data_s.as_str()),
        ("FASTFUSION_HOST", "127.0.0.1"),
        ("FASTFUSION_PORT", "0"),
    ];
    envs.extend_from_slice(&telemetry);
    let mut gateway = Process::spawn(
        &binary("fastfusion-gateway")?,
        &["--worker", &worker_addr],
        &envs,
    )?;
    let base = format!("http://{}", gateway.wait_listening(START)?);
    let client = Client::builder().timeout(Duration::from_secs(60)).build()?;
    wait_http_ok(&client, &format!("{base}/ready"), START).with_context(|| gateway.output())?;

    let response = client
        .post(format!("{base}/v1/images/generations"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"))
        .header("x-request-id", REQUEST_ID)
        .json(
            &json!({"prompt": "a lighthouse", "size": "64x64", "seed": 1,
            "num_inference_steps": 1, "response_format": "b64_json"}),
        )
        .send()?;
    let status = response.status().as_u16();
    ensure!(status == 200, "status {status}: {}", response.text()?);

    let trace = receiver.wait_trace(TRACE_ID, Duration::from_secs(15))?;
    let http = trace
        .iter()
        .find(|span| span.service == "fastfusion-gateway" && span.name == "http")
        .context("the gateway's request span")?;
    assert_eq!(http.parent_span_id, CLIENT_SPAN_ID, "{trace:?}");
    let job = trace
        .iter()
        .find(|span| span.service == "fastfusion-worker" && span.name == "generate")
        .context("the worker's job span")?;
    let gateway_spans: Vec<&str> = trace
        .iter()
        .filter(|span| span.service == "fastfusion-gateway")
        .map(|span| span.span_id.as_str())
        .collect();
    assert!(
        gateway_spans.contains(&job.parent_span_id.as_str()),
        "the worker span's parent must be a gateway span: {trace:?}"
    );

    // JSON logs: the start-up line and the request's access line, with its request id.
    let gateway_logs = json_lines(&gateway.output());
    assert!(
        gateway_logs.iter().any(|line| line["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening on http://"))
            && line["level"] == "INFO"),
        "{gateway_logs:?}"
    );
    assert!(
        gateway_logs
            .iter()
            .any(|line| line["span"]["request_id"] == REQUEST_ID && line["target"].is_string()),
        "no log line carries request_id {REQUEST_ID}: {gateway_logs:?}"
    );
    let worker_logs = json_lines(&worker.output());
    assert!(
        worker_logs.iter().any(|line| line["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening on "))),
        "{worker_logs:?}"
    );
    Ok(())
}
