//! End to end: a client that hangs up mid-generation cancels its job on the worker, so the next
//! request does not wait for the abandoned one's remaining steps. The real gateway binary with
//! its embedded worker on the tiny fixture model; the clients are raw TCP connections, so the
//! test decides the exact moment each one goes away.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use fastfusion_tests::{binary, wait_http_ok, write_tiny_config, Process};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(60);
/// The abandoned requests' steps: far more than the test waits for (the worker's max_steps).
const LONG_STEPS: u32 = 150;

/// Sends a generation request on a fresh connection and returns the connection unread.
fn send_raw(addr: &str, request_id: &str, body: &Value) -> Result<TcpStream> {
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr)?;
    write!(
        stream,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         x-request-id: {request_id}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(stream)
}

/// Waits for the gateway's `started` log line of `request_id` (the worker began denoising it).
fn wait_started(gateway: &mut Process, request_id: &str) -> Result<()> {
    let marker = format!("request_id={request_id}");
    let deadline = Instant::now() + START;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if gateway.wait_for(&marker, left)?.contains(": started ") {
            return Ok(());
        }
    }
}

/// A short generation; returns how long it took.
fn timed_generation(client: &Client, base: &str, steps: u32) -> Result<Duration> {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/v1/images/generations"))
        .json(
            &json!({"prompt": "a small boat", "size": "64x64", "seed": 1,
            "num_inference_steps": steps, "response_format": "b64_json"}),
        )
        .send()?;
    let status = response.status();
    let text = response.text()?;
    ensure!(status.is_success(), "status {status}: {text}");
    Ok(started.elapsed())
}

#[test]
fn a_client_that_hangs_up_does_not_delay_the_next_request() -> Result<()> {
    let config_dir = tempfile::tempdir()?;
    let config = write_tiny_config(config_dir.path(), json!({}))?;
    let data_dir = tempfile::tempdir()?;
    let (config_s, data_s) = (
        config.display().to_string(),
        data_dir.path().display().to_string(),
    );
    let mut gateway = Process::spawn(
        &binary("fastfusion-gateway")?,
        &[],
        &[
            ("CONFIG_PATH", config_s.as_str()),
            ("IMAGE_DATA_PATH", data_s.as_str()),
            ("FASTFUSION_HOST", "127.0.0.1"),
            ("FASTFUSION_PORT", "0"),
            // The handlers log each job's start at debug; the test waits for it.
            ("RUST_LOG", "info,fastfusion_gateway::routes=debug"),
        ],
    )?;
    let addr = gateway.wait_listening(START)?;
    let base = format!("http://{addr}");
    let client = Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    wait_http_ok(&client, &format!("{base}/ready"), START).with_context(|| gateway.output())?;

    // What a denoising step costs here, from two short runs (the first also warms up).
    let one = timed_generation(&client, &base, 1)?;
    let five = timed_generation(&client, &base, 5)?;
    let step = five.saturating_sub(one) / 4;

    // A JSON request and a streamed one, each abandoned once its job is running.
    for (request_id, stream) in [("abandoned-json", false), ("abandoned-sse", true)] {
        let body = json!({"prompt": "a slow painting", "size": "64x64", "stream": stream,
            "num_inference_steps": LONG_STEPS, "response_format": "b64_json"});
        let connection = send_raw(&addr, request_id, &body)?;
        wait_started(&mut gateway, request_id).with_context(|| gateway.output())?;
        drop(connection);
        gateway
            .wait_for(
                &format!("cancelled by the caller request_id={request_id}"),
                Duration::from_secs(60),
            )
            .with_context(|| gateway.output())?;
    }

    // The worker is free again: a short request runs at once, not after the abandoned steps.
    let next = timed_generation(&client, &base, 1)?;
    let abandoned = step * LONG_STEPS;
    ensure!(
        next * 4 < abandoned,
        "the next request took {next:?}; an abandoned job's steps would take {abandoned:?} \
         (one step {step:?})"
    );
    Ok(())
}
