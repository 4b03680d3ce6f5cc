//! `GrpcWorkerPool` against in-process tonic workers on ephemeral ports: Info polling, model
//! resolution and aliases, readiness through `grpc.health.v1`, the Generate stream, status
//! conversion, least-loaded balancing, failover before the first image, DNS discovery through a
//! resolver seam (and real `localhost` resolution), and a worker that is not there.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fastfusion_gateway::workers::discovery::Resolver;
use fastfusion_gateway::workers::{GrpcWorkerPool, ModelRouting, PoolSettings, WorkerPool};
use fastfusion_gateway::ApiError;
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_server::{Worker, WorkerServer, SERVICE_NAME};
use fastfusion_proto::{
    GenerateEvent, GenerateRequest, Image, InfoRequest, InfoResponse, Load, Started, Task,
};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// How a fake worker answers Generate; changeable while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// One image, then the stream ends.
    Serve,
    /// The call is refused with this code.
    Refuse(Code),
    /// Started, then UNAVAILABLE: failed before producing an image.
    FailBeforeImage,
    /// An image, then UNAVAILABLE.
    FailAfterImage,
    /// Started, then nothing: a call that stays in flight.
    Hold,
}

struct FakeWorker {
    model_id: &'static str,
    mode: Arc<Mutex<Mode>>,
    /// Queued requests reported in Info.
    queued: Arc<AtomicU32>,
    /// Generate calls received.
    calls: Arc<AtomicUsize>,
}

type Events = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

fn event(event: Event) -> Result<GenerateEvent, Status> {
    Ok(GenerateEvent { event: Some(event) })
}

#[tonic::async_trait]
impl Worker for FakeWorker {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_id: self.model_id.to_string(),
            tasks: vec![Task::TextToImage as i32],
            max_n: 2,
            native_width: 64,
            native_height: 64,
            load: Some(Load {
                queued: self.queued.load(Ordering::SeqCst),
                running: 0,
            }),
            loaded: true,
            ..Default::default()
        }))
    }

    type GenerateStream = Events;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Events>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        if request.prompt == "refuse" {
            let mut status = Status::invalid_argument("refused prompt");
            status.metadata_mut().insert(
                fastfusion_proto::PARAM_METADATA_KEY,
                tonic::metadata::MetadataValue::from_static("prompt"),
            );
            return Err(status);
        }
        let mode = *self.mode.lock().expect("lock");
        let started = event(Event::Started(Started::default()));
        // A large image checks that the gateway accepts messages over tonic's 4 MiB default.
        let image = event(Event::Image(Image {
            index: 0,
            data: vec![7; 6 * 1024 * 1024],
            seed: request.seed.unwrap_or(5),
            ..Default::default()
        }));
        let failure = || Err(Status::unavailable("worker went away"));
        let events: Events = match mode {
            Mode::Serve => Box::pin(futures::stream::iter([image])),
            Mode::Refuse(code) => return Err(Status::new(code, "refused by the fake")),
            Mode::FailBeforeImage => Box::pin(futures::stream::iter([started, failure()])),
            Mode::FailAfterImage => Box::pin(futures::stream::iter([image, failure()])),
            Mode::Hold => {
                Box::pin(futures::stream::iter([started]).chain(futures::stream::pending()))
            }
        };
        Ok(Response::new(events))
    }
}

/// A running fake worker and the knobs of its behaviour.
struct Fake {
    address: SocketAddr,
    health: HealthReporter,
    mode: Arc<Mutex<Mode>>,
    queued: Arc<AtomicU32>,
    calls: Arc<AtomicUsize>,
}

impl Fake {
    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("lock") = mode;
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }
}

/// Starts a fake worker; its health says NOT_SERVING until `serving`.
async fn start_fake(model_id: &'static str, serving: bool) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (health, health_service) = tonic_health::server::health_reporter();
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status(SERVICE_NAME, status).await;
    let fake = Fake {
        address,
        health,
        mode: Arc::new(Mutex::new(Mode::Serve)),
        queued: Arc::new(AtomicU32::new(0)),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let worker = FakeWorker {
        model_id,
        mode: Arc::clone(&fake.mode),
        queued: Arc::clone(&fake.queued),
        calls: Arc::clone(&fake.calls),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(WorkerServer::new(worker))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    fake
}

fn settings() -> PoolSettings {
    PoolSettings {
        refresh_every: Duration::from_millis(200),
        retry_every: Duration::from_millis(50),
        call_timeout: Duration::from_secs(2),
        dns_refresh_every: Duration::from_millis(50),
        ..PoolSettings::default()
    }
}

/// Waits (up to 5 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..250 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Waits until every replica has been polled healthy: `ready` and one model known per address.
async fn until_polled(pool: &GrpcWorkerPool, fakes: &[&Fake]) {
    // Two refresh periods: the first Info and health answers are in.
    tokio::time::sleep(Duration::from_millis(100)).await;
    eventually("the replicas are known", || {
        fakes
            .iter()
            .all(|f| pool.replica_addresses().contains(&f.address))
            && !pool.models().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
}

fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        n: 1,
        seed: Some(99),
        ..Default::default()
    }
}

/// Runs one request to its end; the events, or the error that refused it.
async fn run(pool: &GrpcWorkerPool, model: &str) -> Result<Vec<Result<Event, String>>, ApiError> {
    let stream = pool.generate(model, request("a cat")).await?;
    Ok(stream
        .map(|event| {
            event
                .map_err(|e| e.kind().to_string())
                .and_then(|e| e.event.ok_or_else(|| "empty event".to_string()))
        })
        .collect()
        .await)
}

fn images(events: &[Result<Event, String>]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Ok(Event::Image(_))))
        .count()
}

#[tokio::test]
async fn single_worker_info_readiness_and_generate() {
    let fake = start_fake("tiny-sd", false).await;
    let pool = GrpcWorkerPool::start(&[fake.endpoint()], settings()).expect("pool");

    let info = pool.info(None).await.expect("info");
    assert_eq!(info.model_id, "tiny-sd");
    // One model served: any name is it.
    assert_eq!(
        pool.info(Some("dall-e-3")).await.expect("info").model_id,
        "tiny-sd"
    );
    assert_eq!(pool.models(), vec!["tiny-sd".to_string()]);

    assert!(!pool.ready().await, "NOT_SERVING while loading");
    fake.health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    assert!(pool.ready().await);

    let events: Vec<_> = pool
        .generate("tiny-sd", request("a cat"))
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

    match pool.generate("tiny-sd", request("refuse")).await {
        Err(ApiError::InvalidRequest { param, .. }) => assert_eq!(param.as_deref(), Some("prompt")),
        Err(other) => panic!("expected a 400, got {other:?}"),
        Ok(_) => panic!("expected a 400, got a stream"),
    }
    // A bad request is the answer, not a reason to go elsewhere.
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn several_models_resolve_by_name_alias_and_default() {
    let a = start_fake("model-a", true).await;
    let b = start_fake("model-b", true).await;
    let endpoints = [a.endpoint(), b.endpoint()];
    let pool = GrpcWorkerPool::start(&endpoints, settings()).expect("pool");
    eventually("both models are known", || pool.models().len() == 2).await;
    assert_eq!(pool.models(), vec!["model-a", "model-b"]);
    assert_eq!(pool.info(None).await.expect("default").model_id, "model-a");
    assert_eq!(
        pool.info(Some("model-b")).await.expect("b").model_id,
        "model-b"
    );
    match pool.info(Some("dall-e-3")).await {
        Err(ApiError::ModelNotFound { available, .. }) => {
            assert_eq!(available, vec!["model-a", "model-b"])
        }
        other => panic!("expected model_not_found, got {other:?}"),
    }

    let routing = ModelRouting {
        aliases: [("dall-e-3".to_string(), "model-b".to_string())].into(),
        default_model: Some("model-b".to_string()),
    };
    let pool = GrpcWorkerPool::start(
        &endpoints,
        PoolSettings {
            routing,
            ..settings()
        },
    )
    .expect("pool");
    eventually("both models are known", || pool.models().len() == 2).await;
    assert_eq!(pool.models(), vec!["model-b", "model-a"], "default first");
    assert_eq!(pool.info(None).await.expect("default").model_id, "model-b");
    assert!(pool.ready().await);
    assert_eq!(
        pool.info(Some("dall-e-3")).await.expect("alias").model_id,
        "model-b"
    );
    let before = b.calls();
    let events = run(&pool, "model-b").await.expect("stream");
    assert_eq!(images(&events), 1);
    assert_eq!(b.calls(), before + 1);
    assert_eq!(a.calls(), 0, "model-a's worker never sees model-b's work");

    // A default model nobody serves: not ready, and requests naming no model wait for it.
    let routing = ModelRouting {
        default_model: Some("model-c".to_string()),
        ..ModelRouting::default()
    };
    let pool = GrpcWorkerPool::start(
        &endpoints,
        PoolSettings {
            routing,
            ..settings()
        },
    )
    .expect("pool");
    eventually("both models are known", || pool.models().len() == 2).await;
    assert!(!pool.ready().await);
    assert!(matches!(
        pool.info(None).await,
        Err(ApiError::Unavailable(_))
    ));
    assert_eq!(
        pool.info(Some("model-a")).await.expect("a").model_id,
        "model-a"
    );
}

#[tokio::test]
async fn the_least_loaded_replica_gets_the_request() {
    let a = start_fake("sd", true).await;
    let b = start_fake("sd", true).await;
    // A reports two queued requests of other gateways.
    a.queued.store(2, Ordering::SeqCst);
    let pool = GrpcWorkerPool::start(&[a.endpoint(), b.endpoint()], settings()).expect("pool");
    until_polled(&pool, &[&a, &b]).await;

    // Finished requests leave no load behind: B (0) always beats A (2).
    for _ in 0..3 {
        assert_eq!(images(&run(&pool, "sd").await.expect("stream")), 1);
    }
    assert_eq!((a.calls(), b.calls()), (0, 3));

    // Calls held open count: B takes two (loads 1, then 2), the third ties (A 2, B 2) and goes
    // either way, and the fourth goes to whichever is less loaded then: 1 and 3 in all.
    a.set(Mode::Hold);
    b.set(Mode::Hold);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = pool.generate("sd", request("hold")).await.expect("stream");
        assert!(matches!(
            stream.next().await,
            Some(Ok(GenerateEvent {
                event: Some(Event::Started(_))
            }))
        ));
        held.push(stream);
    }
    assert_eq!((a.calls(), b.calls() - 3), (1, 3));
}

#[tokio::test]
async fn full_or_unavailable_replicas_are_skipped() {
    let a = start_fake("sd", true).await;
    let b = start_fake("sd", true).await;
    let pool = GrpcWorkerPool::start(&[a.endpoint(), b.endpoint()], settings()).expect("pool");
    until_polled(&pool, &[&a, &b]).await;

    a.set(Mode::Refuse(Code::ResourceExhausted));
    for _ in 0..4 {
        assert_eq!(images(&run(&pool, "sd").await.expect("stream")), 1);
    }
    assert_eq!(b.calls(), 4, "every request ends on B");
    assert!(
        a.calls() >= 1,
        "ties rotate, so A was tried first at least once"
    );
    assert!(a.calls() <= 4, "A is tried at most once per request");

    // Both full: 429 after trying each once.
    b.set(Mode::Refuse(Code::ResourceExhausted));
    let (a_before, b_before) = (a.calls(), b.calls());
    assert!(matches!(run(&pool, "sd").await, Err(ApiError::Busy(_))));
    assert_eq!((a.calls() - a_before, b.calls() - b_before), (1, 1));

    // Draining or loading everywhere: 503, naming the worker's reason.
    a.set(Mode::Refuse(Code::Unavailable));
    b.set(Mode::Refuse(Code::Unavailable));
    match run(&pool, "sd").await {
        Err(ApiError::Unavailable(message)) => {
            assert!(message.contains("refused by the fake"), "{message}")
        }
        other => panic!("expected 503, got {other:?}"),
    }
}

#[tokio::test]
async fn failure_before_the_first_image_is_retried_after_it_is_not() {
    let a = start_fake("sd", true).await;
    let b = start_fake("sd", true).await;
    // B looks busier, so A is always tried first.
    b.queued.store(1, Ordering::SeqCst);
    let pool = GrpcWorkerPool::start(&[a.endpoint(), b.endpoint()], settings()).expect("pool");
    until_polled(&pool, &[&a, &b]).await;

    a.set(Mode::FailBeforeImage);
    let events = run(&pool, "sd").await.expect("stream");
    assert!(events.iter().all(Result::is_ok), "{events:?}");
    assert_eq!(images(&events), 1);
    assert_eq!((a.calls(), b.calls()), (1, 1));

    // A is unhealthy until its next poll says otherwise; after that it is first again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    a.set(Mode::FailAfterImage);
    let events = run(&pool, "sd").await.expect("stream");
    assert_eq!(images(&events), 1);
    assert_eq!(events.last(), Some(&Err("unavailable".to_string())));
    assert_eq!((a.calls(), b.calls()), (2, 1), "not retried after an image");
}

/// Addresses a test can change while the pool runs.
struct FakeDns {
    answer: Mutex<io::Result<Vec<SocketAddr>>>,
}

#[async_trait::async_trait]
impl Resolver for FakeDns {
    async fn resolve(&self, host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
        assert_eq!(host, "workers.test");
        match &*self.answer.lock().expect("lock") {
            Ok(addresses) => Ok(addresses.clone()),
            Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
        }
    }
}

impl FakeDns {
    fn set(&self, answer: io::Result<Vec<SocketAddr>>) {
        *self.answer.lock().expect("lock") = answer;
    }
}

#[tokio::test]
async fn replicas_come_and_go_with_dns() {
    let a = start_fake("sd", true).await;
    let b = start_fake("sd", true).await;
    let dns = Arc::new(FakeDns {
        answer: Mutex::new(Ok(vec![a.address])),
    });
    let pool = GrpcWorkerPool::start_with_resolver(
        &["http://workers.test:50051".to_string()],
        settings(),
        Arc::clone(&dns) as Arc<dyn Resolver>,
    )
    .expect("pool");
    eventually("A is discovered", || {
        pool.replica_addresses() == vec![a.address]
    })
    .await;

    dns.set(Ok(vec![b.address, a.address]));
    let mut both = vec![a.address, b.address];
    both.sort();
    eventually("B is discovered", || pool.replica_addresses() == both).await;
    until_polled(&pool, &[&a, &b]).await;
    for _ in 0..4 {
        assert_eq!(images(&run(&pool, "sd").await.expect("stream")), 1);
    }
    assert_eq!(
        (a.calls(), b.calls()),
        (2, 2),
        "equal replicas share the work"
    );

    // A lookup failure keeps what is known.
    dns.set(Err(io::Error::other("SERVFAIL")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pool.replica_addresses(), both);

    dns.set(Ok(vec![b.address]));
    eventually("A is gone", || pool.replica_addresses() == vec![b.address]).await;
    for _ in 0..2 {
        assert_eq!(images(&run(&pool, "sd").await.expect("stream")), 1);
    }
    assert_eq!((a.calls(), b.calls()), (2, 4));
}

#[tokio::test]
async fn localhost_is_resolved_for_real() {
    let fake = start_fake("sd", true).await;
    let endpoint = format!("http://localhost:{}", fake.address.port());
    let pool = GrpcWorkerPool::start(&[endpoint], settings()).expect("pool");
    assert_eq!(pool.info(None).await.expect("info").model_id, "sd");
    assert!(pool.replica_addresses().contains(&fake.address));
    assert!(pool.ready().await);
    assert_eq!(images(&run(&pool, "sd").await.expect("stream")), 1);
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
    assert!(matches!(
        pool.generate("sd", request("a cat")).await,
        Err(ApiError::Unavailable(_))
    ));
}
