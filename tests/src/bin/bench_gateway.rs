//! `bench-gateway`: what the gateway costs per request. Prints
//!
//! * **overhead**: latency of one generation sent straight to a worker over gRPC, and the same
//!   generation through the real `fastfusion-gateway` process in front of that worker (p50, p99;
//!   sequential calls, alternating). The worker is an in-process stub that answers Generate at
//!   once with a fixed PNG, so model time (and its noise) is not in either figure and the
//!   difference is only the gateway: HTTP, validation, routing, the gRPC hop, base64 of the
//!   image, the response and its access-log line;
//! * **stored images**: requests/second for `GET /v1/images/data/{id}` of one stored image at a
//!   concurrency, with its p50/p99 latency.
//!
//! Run with `scripts/bench-gateway` (release build); the gateway binary is looked up next to
//! this one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::worker_server::{Worker, WorkerServer};
use fastfusion_proto::{
    Defaults, Done, Endpoint, GenerateEvent, GenerateRequest, Image, InfoRequest, InfoResponse,
    Limits, OutputFormat, Task, Timings,
};
use fastfusion_tests::Process;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::json;
use tonic::{Request, Response, Status};

#[derive(Parser, Debug)]
#[command(
    name = "bench-gateway",
    about = "Gateway overhead and stored-image throughput"
)]
struct Args {
    /// Generations per path (direct and through the gateway), after warm-up.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Side of the stub worker's square PNG (its bytes travel both paths).
    #[arg(long, default_value_t = 512)]
    size: u32,
    /// Concurrent clients fetching the stored image.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of stored-image fetching.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Where fastfusion-gateway is; default: next to this binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

const START: Duration = Duration::from_secs(60);
const MODEL: &str = "stub";

fn main() -> Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .context("no directory for this binary")?,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let worker_addr = runtime.block_on(start_stub_worker(png(args.size)?))?;

    let dir = tempfile::tempdir()?;
    let data_s = dir.path().join("data").display().to_string();
    let worker_s = worker_addr.to_string();
    // Default log level: the access-log line per request is part of the gateway's real cost.
    let mut gateway = Process::spawn(
        &bin_dir.join("fastfusion-gateway"),
        &["--worker", &worker_s],
        &[
            ("IMAGE_DATA_PATH", data_s.as_str()),
            ("FASTFUSION_HOST", "127.0.0.1"),
            ("FASTFUSION_PORT", "0"),
        ],
    )?;
    let base = format!("http://{}", gateway.wait_listening(START)?);
    runtime.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .build()?;
        wait_ready(&http, &base).await?;
        let grpc = WorkerClient::connect(format!("http://{worker_addr}"))
            .await?
            .max_decoding_message_size(64 * 1024 * 1024);
        overhead(&http, &base, grpc, &args).await?;
        stored_image(&http, &base, &args).await
    })?;
    // Stopped here, not at exit: `Process` kills it on drop.
    drop(gateway);
    Ok(())
}

/// A PNG of `side`² noise-free gradient pixels.
fn png(side: u32) -> Result<Vec<u8>> {
    let image = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// A worker that answers every Generate at once with `png`, `n` times.
struct StubWorker {
    png: Vec<u8>,
}

#[tonic::async_trait]
impl Worker for StubWorker {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_id: MODEL.to_string(),
            tasks: vec![Task::TextToImage as i32],
            endpoints: vec![Endpoint::Generations as i32],
            max_n: 4,
            native_width: 512,
            native_height: 512,
            limits: Some(Limits {
                max_pixels: 4096 * 4096,
                size_multiple: 8,
                max_steps: 150,
                max_queue: 1024,
                max_batch: 4,
                max_prompt_tokens: 77,
                max_sequence_length: 0,
            }),
            defaults: Some(Defaults {
                guidance_scale: 7.5,
                num_inference_steps: 1,
                scheduler: "euler".to_string(),
                strength: 0.8,
            }),
            schedulers: vec!["euler".to_string()],
            loaded: true,
            ..Default::default()
        }))
    }

    type GenerateStream = BoxStream<'static, Result<GenerateEvent, Status>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let request = request.into_inner();
        let mut events: Vec<Result<GenerateEvent, Status>> = (0..request.n)
            .map(|index| {
                Ok(GenerateEvent {
                    event: Some(Event::Image(Image {
                        index,
                        data: self.png.clone(),
                        format: OutputFormat::Png as i32,
                        width: request.width,
                        height: request.height,
                        seed: request.seed.unwrap_or(1),
                        partial_index: 0,
                    })),
                })
            })
            .collect();
        events.push(Ok(GenerateEvent {
            event: Some(Event::Done(Done {
                timings: Some(Timings::default()),
            })),
        }));
        Ok(Response::new(futures::stream::iter(events).boxed()))
    }
}

/// Serves the stub (and a SERVING health check) on a loopback port.
async fn start_stub_worker(png: Vec<u8>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<WorkerServer<StubWorker>>().await;
    let service = WorkerServer::new(StubWorker { png }).max_encoding_message_size(64 * 1024 * 1024);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(service)
            .serve_with_incoming(
                // Nagle off, as the real worker does: it would add the client's delayed ACK.
                tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
                    let stream = accepted?;
                    stream.set_nodelay(true)?;
                    Ok::<_, std::io::Error>(stream)
                }),
            ),
    );
    Ok(addr)
}

async fn wait_ready(http: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + START;
    while Instant::now() < deadline {
        if let Ok(response) = http.get(format!("{base}/ready")).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the gateway was not ready within {START:?}")
}

/// What the gateway sends the worker for `generation_body`.
fn grpc_request(size: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        request_id: format!("bench-{seed}"),
        task: Task::TextToImage as i32,
        endpoint: Endpoint::Generations as i32,
        prompt: "a lighthouse".to_string(),
        n: 1,
        width: size,
        height: size,
        seed: Some(seed),
        num_inference_steps: Some(1),
        output_format: OutputFormat::Png as i32,
        ..Default::default()
    }
}

fn generation_body(size: u32, seed: u64, response_format: &str) -> serde_json::Value {
    json!({"prompt": "a lighthouse", "size": format!("{size}x{size}"), "seed": seed,
        "num_inference_steps": 1, "response_format": response_format})
}

async fn direct(
    grpc: &mut WorkerClient<tonic::transport::Channel>,
    size: u32,
    seed: u64,
) -> Result<Duration> {
    let started = Instant::now();
    let mut stream = grpc.generate(grpc_request(size, seed)).await?.into_inner();
    let mut images = 0;
    while let Some(event) = stream.next().await {
        match event?.event {
            Some(Event::Image(_)) => images += 1,
            Some(Event::Done(_)) => break,
            _ => {}
        }
    }
    ensure!(images == 1, "the worker sent {images} images");
    Ok(started.elapsed())
}

async fn through_gateway(
    http: &reqwest::Client,
    base: &str,
    size: u32,
    seed: u64,
) -> Result<Duration> {
    let started = Instant::now();
    let response = http
        .post(format!("{base}/v1/images/generations"))
        .json(&generation_body(size, seed, "b64_json"))
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    ensure!(
        status.is_success(),
        "gateway answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(started.elapsed())
}

async fn overhead(
    http: &reqwest::Client,
    base: &str,
    mut grpc: WorkerClient<tonic::transport::Channel>,
    args: &Args,
) -> Result<()> {
    for seed in 0..20 {
        direct(&mut grpc, args.size, seed).await?;
        through_gateway(http, base, args.size, seed).await?;
    }
    let mut straight = Vec::with_capacity(args.requests);
    let mut gateway = Vec::with_capacity(args.requests);
    for i in 0..args.requests as u64 {
        straight.push(direct(&mut grpc, args.size, i).await?);
        gateway.push(through_gateway(http, base, args.size, i).await?);
    }
    let (d50, d99) = (
        percentile(&mut straight, 0.50),
        percentile(&mut straight, 0.99),
    );
    let (g50, g99) = (
        percentile(&mut gateway, 0.50),
        percentile(&mut gateway, 0.99),
    );
    println!(
        "generation, instant stub worker, {side}x{side} PNG ({kib} KiB), {n} sequential requests per path",
        side = args.size,
        kib = png(args.size)?.len() / 1024,
        n = args.requests
    );
    println!("{:<30} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!(
        "{:<30} {:>10.3} {:>10.3}",
        "worker direct (gRPC)",
        ms(d50),
        ms(d99)
    );
    println!(
        "{:<30} {:>10.3} {:>10.3}",
        "through the gateway (HTTP)",
        ms(g50),
        ms(g99)
    );
    println!(
        "{:<30} {:>10.3} {:>10.3}",
        "gateway overhead",
        ms(g50) - ms(d50),
        ms(g99) - ms(d99)
    );
    Ok(())
}

async fn stored_image(http: &reqwest::Client, base: &str, args: &Args) -> Result<()> {
    let response: serde_json::Value = http
        .post(format!("{base}/v1/images/generations"))
        .json(&generation_body(args.size, 1, "url"))
        .send()
        .await?
        .json()
        .await?;
    let url = Arc::new(
        response["data"][0]["url"]
            .as_str()
            .context("no url in the response")?
            .to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let clients = (0..args.concurrency).map(|_| {
        let (http, url) = (http.clone(), Arc::clone(&url));
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut bytes = 0usize;
            while Instant::now() < deadline {
                let started = Instant::now();
                let response = http.get(url.as_str()).send().await?;
                ensure!(
                    response.status().is_success(),
                    "GET {url}: {}",
                    response.status()
                );
                bytes += response.bytes().await?.len();
                latencies.push(started.elapsed());
            }
            Ok::<_, anyhow::Error>((latencies, bytes))
        })
    });
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut bytes = 0;
    for client in futures::future::join_all(clients).await {
        let (mine, size) = client??;
        latencies.extend(mine);
        bytes += size;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let count = latencies.len();
    println!();
    println!(
        "stored image GET, {} clients, {} s, {} KiB per image",
        args.concurrency,
        args.seconds,
        bytes / count.max(1) / 1024
    );
    println!(
        "{:<30} {:>10.0} req/s   p50 {:.3} ms   p99 {:.3} ms",
        "GET /v1/images/data/{id}",
        count as f64 / elapsed,
        ms(percentile(&mut latencies, 0.50)),
        ms(percentile(&mut latencies, 0.99))
    );
    Ok(())
}

/// The `q` quantile (nearest rank); zero for no samples.
fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
