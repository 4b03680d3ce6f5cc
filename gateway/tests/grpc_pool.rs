//! `GrpcWorkerPool` against an in-process tonic worker on an ephemeral port: Info polling, model
//! resolution, readiness through `grpc.health.v1`, the Generate stream, status conversion, and a
//! worker that is not there.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use fastfusion_gateway::workers::{GrpcWorkerPool, PoolSettings, WorkerPool};
use fastfusion_gateway::ApiError;
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_server::{Worker, WorkerServer, SERVICE_NAME};
use fastfusion_proto::{GenerateEvent, GenerateRequest, Image, InfoRequest, InfoResponse, Task};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

struct FakeWorker {
    model_id: &'static str,
}

type Events = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for FakeWorker {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_id: self.model_id.to_string(),
            tasks: vec![Task::TextToImage as i32],
            max_n: 2,
            native_width: 64,
            native_height: 64,
            loaded: true,
            ..Default::default()
        }))
    }

    type GenerateStream = Events;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Events>, Status> {
        let request = request.into_inner();
        if request.prompt == "refuse" {
            let mut status = Status::invalid_argument("refused prompt");
            status.metadata_mut().insert(
                fastfusion_proto::PARAM_METADATA_KEY,
                tonic::metadata::MetadataValue::from_static("prompt"),
            );
            return Err(status);
        }
        // A large image checks that the gateway accepts messages over tonic's 4 MiB default.
        let image = GenerateEvent {
            event: Some(Event::Image(Image {
                index: 0,
                data: vec![7; 6 * 1024 * 1024],
                seed: request.seed.unwrap_or(5),
                ..Default::default()
            })),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(image)]))))
    }
}

async fn start_worker(model_id: &'static str) -> (SocketAddr, HealthReporter) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(WorkerServer::new(FakeWorker { model_id }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (address, reporter)
}

fn settings() -> PoolSettings {
    PoolSettings {
        refresh_every: Duration::from_millis(200),
        retry_every: Duration::from_millis(50),
        call_timeout: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn single_worker_info_readiness_and_generate() {
    let (address, reporter) = start_worker("tiny-sd").await;
    let pool = GrpcWorkerPool::start(&[format!("http://{address}")], settings()).expect("pool");

    let info = pool.info(None).await.expect("info");
    assert_eq!(info.model_id, "tiny-sd");
    // One model served: any name is it.
    assert_eq!(
        pool.info(Some("dall-e-3")).await.expect("info").model_id,
        "tiny-sd"
    );
    assert_eq!(pool.models(), vec!["tiny-sd".to_string()]);

    assert!(!pool.ready().await, "NOT_SERVING while loading");
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    assert!(pool.ready().await);

    let request = GenerateRequest {
        prompt: "a cat".into(),
        n: 1,
        seed: Some(99),
        ..Default::default()
    };
    let events: Vec<_> = pool
        .generate("tiny-sd", request)
        .await
        .expect("stream")
        .collect()
        .await;
    assert_eq!(events.len(), 1);
    match events.into_iter().next().map(|e| e.map(|e| e.event)) {
        Some(Ok(Some(Event::Image(image)))) => {
            assert_eq!(image.seed, 99);
            assert_eq!(image.data.len(), 6 * 1024 * 1024);
        }
        other => panic!("expected an image, got {other:?}"),
    }

    let refused = GenerateRequest {
        prompt: "refuse".into(),
        ..Default::default()
    };
    match pool.generate("tiny-sd", refused).await {
        Err(ApiError::InvalidRequest { param, .. }) => assert_eq!(param.as_deref(), Some("prompt")),
        Err(other) => panic!("expected a 400, got {other:?}"),
        Ok(_) => panic!("expected a 400, got a stream"),
    }
}

#[tokio::test]
async fn several_models_resolve_by_name_and_default_to_the_first() {
    let (a, _ra) = start_worker("model-a").await;
    let (b, _rb) = start_worker("model-b").await;
    let pool = GrpcWorkerPool::start(&[format!("http://{a}"), format!("http://{b}")], settings())
        .expect("pool");
    // Wait until both workers have been polled.
    for _ in 0..100 {
        if pool.models().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pool.models(),
        vec!["model-a".to_string(), "model-b".to_string()]
    );
    assert_eq!(pool.info(None).await.expect("default").model_id, "model-a");
    assert_eq!(
        pool.info(Some("model-b")).await.expect("b").model_id,
        "model-b"
    );
    match pool.info(Some("dall-e-3")).await {
        Err(ApiError::ModelNotFound { available, .. }) => {
            assert_eq!(
                available,
                vec!["model-a".to_string(), "model-b".to_string()]
            )
        }
        other => panic!("expected model_not_found, got {other:?}"),
    }
}

#[tokio::test]
async fn an_absent_worker_is_unavailable_not_an_error() {
    // Bind and drop to find a port nobody listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let pool =
        GrpcWorkerPool::start(&[format!("http://127.0.0.1:{port}")], settings()).expect("pool");
    assert!(matches!(
        pool.info(None).await,
        Err(ApiError::Unavailable(_))
    ));
    assert!(!pool.ready().await);
    assert!(pool.models().is_empty());
}
