//! A model that cannot load is a failure, not a wait: the real binaries on an SDXL repo whose
//! `text_encoder_2` is missing.
//!
//! - a standalone worker logs the reason and exits non-zero (a restart loop with the reason in
//!   the log, under Kubernetes);
//! - a gateway with an embedded worker stops with the reason;
//! - a gateway whose remote worker failed says why on `/ready` and in its 503 answers.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use fastfusion_tests::{binary, fixture, write_tiny_config, Process};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(60);

/// tiny-sdxl without `text_encoder_2`, its parts symlinked into `dir`.
fn broken_sdxl(dir: &Path) -> Result<std::path::PathBuf> {
    let source = fixture("models/tiny-sdxl");
    let model = dir.join("broken-sdxl");
    std::fs::create_dir(&model)?;
    for entry in std::fs::read_dir(&source)? {
        let entry = entry?;
        if entry.file_name() != "text_encoder_2" {
            std::os::unix::fs::symlink(entry.path(), model.join(entry.file_name()))?;
        }
    }
    Ok(model)
}

fn broken_config(dir: &Path) -> Result<std::path::PathBuf> {
    let model = broken_sdxl(dir)?;
    write_tiny_config(dir, json!({"hf_model_id": model}))
}

fn wait_exit(process: &mut Process, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = process.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("still running after {timeout:?}:\n{}", process.output())
}

#[test]
fn a_standalone_worker_exits_non_zero_with_the_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = broken_config(dir.path())?;
    let mut worker = Process::spawn(
        &binary("fastfusion-worker")?,
        &[
            "serve",
            "--config",
            &config.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("FASTFUSION_FAILED_LOAD_LINGER_SECS", "0")],
    )?;
    let status = wait_exit(&mut worker, START)?;
    let output = worker.output();
    ensure!(!status.success(), "exited with {status}:\n{output}");
    ensure!(
        output.contains("text_encoder_2/config.json") && output.contains("failed to load"),
        "the log does not say why:\n{output}"
    );
    Ok(())
}

#[test]
fn a_gateway_with_an_embedded_worker_stops_with_the_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = broken_config(dir.path())?;
    let data = tempfile::tempdir()?;
    let mut gateway = Process::spawn(
        &binary("fastfusion-gateway")?,
        &[],
        &[
            ("CONFIG_PATH", &config.display().to_string()),
            ("IMAGE_DATA_PATH", &data.path().display().to_string()),
            ("FASTFUSION_HOST", "127.0.0.1"),
            ("FASTFUSION_PORT", "0"),
        ],
    )?;
    let status = wait_exit(&mut gateway, START)?;
    let output = gateway.output();
    ensure!(!status.success(), "exited with {status}:\n{output}");
    ensure!(
        output.contains("failed to load") && output.contains("text_encoder_2/config.json"),
        "the gateway does not say why:\n{output}"
    );
    Ok(())
}

#[test]
fn a_gateway_reports_a_remote_workers_failed_load() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = broken_config(dir.path())?;
    // The worker keeps answering Info for a minute after its load failed.
    let mut worker = Process::spawn(
        &binary("fastfusion-worker")?,
        &[
            "serve",
            "--config",
            &config.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("FASTFUSION_FAILED_LOAD_LINGER_SECS", "60")],
    )?;
    let worker_addr = worker.wait_listening(START)?;
    let data = tempfile::tempdir()?;
    let mut gateway = Process::spawn(
        &binary("fastfusion-gateway")?,
        &["--worker", &worker_addr],
        &[
            ("IMAGE_DATA_PATH", &data.path().display().to_string()),
            ("FASTFUSION_HOST", "127.0.0.1"),
            ("FASTFUSION_PORT", "0"),
        ],
    )?;
    let base = format!("http://{}", gateway.wait_listening(START)?);
    let client = Client::builder().timeout(Duration::from_secs(30)).build()?;
    let deadline = Instant::now() + START;
    let ready = loop {
        let response = client.get(format!("{base}/ready")).send()?;
        let status = response.status().as_u16();
        let body: Value = response.json()?;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        if message.contains("failed to load") {
            ensure!(status == 503, "/ready answered {status}");
            break message.to_string();
        }
        if Instant::now() > deadline {
            bail!("/ready never said why: {body}\n{}", gateway.output());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(ready.contains("text_encoder_2"), "{ready}");
    let response = client
        .post(format!("{base}/v1/images/generations"))
        .json(&json!({"prompt": "a red circle", "size": "64x64"}))
        .send()
        .context("generation")?;
    let status = response.status().as_u16();
    let body: Value = response.json()?;
    ensure!(status == 503, "generation answered {status}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("failed to load") && message.contains("text_encoder_2"),
        "{body}"
    );
    Ok(())
}
