//! `GET /metrics` after real requests through the router (fake worker pool): request counts by
//! matched route and status, latency histograms, images and worker timings by model. Worker health
//! and retries come from the real `GrpcWorkerPool` over in-process tonic workers.
//!
//! The recorder is process-global, so every test in this binary reads deltas between two
//! scrapes, and only one test drives requests.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{app, Behaviour, TestApp};
use fastfusion_gateway::workers::{GrpcWorkerPool, PoolSettings, WorkerPool};
use fastfusion_gateway::ApiError;
use fastfusion_proto::worker_server::{Worker, WorkerServer, SERVICE_NAME};
use fastfusion_proto::{GenerateEvent, GenerateRequest, InfoRequest, InfoResponse, Task};
use futures::stream::BoxStream;
use tonic::{Request, Response, Status};

/// The value of the series `name{labels}` exactly as rendered; 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

async fn scrape(app: &TestApp) -> String {
    let reply = app.call("GET", "/metrics", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let content_type = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    String::from_utf8(reply.body.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn requests_images_and_timings_are_counted() {
    fastfusion_gateway::metrics::install().expect("recorder");
    let app = app(Behaviour::Succeed);
    let before = scrape(&app).await;

    for _ in 0..2 {
        let reply = app
            .generate(r#"{"prompt":"a red fox","n":2,"response_format":"url"}"#)
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let url = app
        .generate(r#"{"prompt":"a red fox","response_format":"url"}"#)
        .await
        .json()["data"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    let path = url
        .strip_prefix("http://gateway.test:8123")
        .expect("local url");
    assert_eq!(app.call("GET", path, None).await.status, StatusCode::OK);
    assert_eq!(
        app.call("GET", "/v1/images/data/img_nope.png", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.generate(r#"{"prompt":"a red fox","n":99}"#)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.call("GET", "/no/such/route-12345", None).await.status,
        StatusCode::NOT_FOUND
    );

    let after = scrape(&app).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    let requests = |route: &str, status: u16| {
        delta(&format!(
            "fastfusion_gateway_requests_total{{route=\"{route}\",status=\"{status}\"}}"
        ))
    };
    assert_eq!(requests("/v1/images/generations", 200), 3.0, "{after}");
    assert_eq!(requests("/v1/images/generations", 400), 1.0, "{after}");
    assert_eq!(requests("/v1/images/data/{file_id}", 200), 1.0, "{after}");
    assert_eq!(requests("/v1/images/data/{file_id}", 404), 1.0, "{after}");
    assert_eq!(requests("unmatched", 404), 1.0, "{after}");
    // Paths with ids never become label values.
    assert!(!after.contains("img_nope") && !after.contains("route-12345"));

    assert_eq!(
        delta(
            "fastfusion_gateway_request_duration_seconds_count{route=\"/v1/images/generations\"}"
        ),
        4.0
    );
    // Every request takes longer than 0 and less than the largest bucket.
    assert_eq!(
        delta(
            "fastfusion_gateway_request_duration_seconds_bucket{route=\"/v1/images/generations\",le=\"+Inf\"}"
        ),
        4.0
    );
    assert_eq!(
        delta("fastfusion_gateway_images_generated_total{model=\"tiny-sd\"}"),
        5.0
    );
    assert_eq!(
        delta("fastfusion_gateway_queue_seconds_count{model=\"tiny-sd\"}"),
        3.0
    );
    assert_eq!(
        delta("fastfusion_gateway_inference_seconds_count{model=\"tiny-sd\"}"),
        3.0
    );
    // The scrape itself is counted by the time of the next one.
    assert!(
        sample(
            &after,
            "fastfusion_gateway_requests_total{route=\"/metrics\",status=\"200\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn series_are_described_with_explicit_buckets() {
    fastfusion_gateway::metrics::install().expect("recorder");
    let app = app(Behaviour::Succeed);
    assert_eq!(
        app.call("GET", "/health", None).await.status,
        StatusCode::OK
    );
    let text = scrape(&app).await;
    for line in [
        "# TYPE fastfusion_gateway_requests_total counter",
        "# TYPE fastfusion_gateway_request_duration_seconds histogram",
        "# HELP fastfusion_gateway_requests_total HTTP requests answered, by route and status",
    ] {
        assert!(text.contains(line), "missing '{line}' in:\n{text}");
    }
    assert!(
        text.contains(
            "fastfusion_gateway_request_duration_seconds_bucket{route=\"/health\",le=\"0.005\"}"
        ),
        "{text}"
    );
}

/// A worker whose model is loaded and healthy, and whose queue is always full.
struct FullWorker;

const FULL_MODEL: &str = "metrics-full";

#[tonic::async_trait]
impl Worker for FullWorker {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_id: FULL_MODEL.to_string(),
            tasks: vec![Task::TextToImage as i32],
            max_n: 1,
            loaded: true,
            ..Default::default()
        }))
    }

    type GenerateStream = BoxStream<'static, Result<GenerateEvent, Status>>;

    async fn generate(
        &self,
        _: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::resource_exhausted("queue full"))
    }
}

async fn start_full_worker() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(WorkerServer::new(FullWorker))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    address
}

#[tokio::test]
async fn worker_health_and_retries_are_reported() {
    let handle = fastfusion_gateway::metrics::install().expect("recorder");
    let (a, b) = (start_full_worker().await, start_full_worker().await);
    let settings = PoolSettings {
        refresh_every: Duration::from_millis(100),
        retry_every: Duration::from_millis(50),
        ..PoolSettings::default()
    };
    let pool = GrpcWorkerPool::start(&[format!("http://{a}"), format!("http://{b}")], settings)
        .expect("pool");
    let up = |text: &str, address: std::net::SocketAddr| {
        let prefix = format!("fastfusion_gateway_worker_up{{endpoint=\"{address} (");
        text.lines()
            .find(|line| {
                line.starts_with(&prefix) && line.contains(&format!("model=\"{FULL_MODEL}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let mut text = String::new();
    for _ in 0..100 {
        text = handle.render();
        if up(&text, a) == Some(1.0) && up(&text, b) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up(&text, a), Some(1.0), "{text}");
    assert_eq!(up(&text, b), Some(1.0), "{text}");

    let retries =
        format!("fastfusion_gateway_retries_total{{model=\"{FULL_MODEL}\",reason=\"busy\"}}");
    let before = sample(&handle.render(), &retries);
    let request = GenerateRequest {
        prompt: "a cat".to_string(),
        n: 1,
        ..Default::default()
    };
    // Both replicas are full: the first refusal is retried on the other, the second is the answer.
    assert!(matches!(
        pool.generate(FULL_MODEL, request).await.map(|_| ()),
        Err(ApiError::Busy(_))
    ));
    assert_eq!(sample(&handle.render(), &retries) - before, 1.0);
}
