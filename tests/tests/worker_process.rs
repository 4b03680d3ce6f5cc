//! The real `fastfusion-worker serve` process on the tiny fixture model, behind a real gateway:
//! Prometheus metrics on `--metrics-listen`, and graceful drain on SIGTERM (sent with `kill`).

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use fastfusion_tests::{binary, wait_http_ok, write_tiny_config, Process};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(60);

/// A worker process whose output goes to a file, so the test can signal it by pid and read its
/// exit status.
struct Worker {
    child: Child,
    log: PathBuf,
    grpc: String,
    metrics: String,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(envs: &[(&str, &str)]) -> Result<Worker> {
        let dir = tempfile::tempdir()?;
        // Room for requests long enough to be caught mid-flight.
        let config = write_tiny_config(dir.path(), json!({"max_steps": 1000}))?;
        let log = dir.path().join("worker.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(binary("fastfusion-worker")?)
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .envs(envs.iter().copied())
            .env("FASTFUSION_LOGLEVEL", "info")
            .env("NO_COLOR", "1")
            .env_remove("CONFIG_PATH")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        let mut worker = Worker {
            child,
            log,
            grpc: String::new(),
            metrics: String::new(),
            _dir: dir,
        };
        worker.metrics = worker.wait_log("metrics at ", START)?;
        worker.grpc = worker.wait_log("listening on ", START)?;
        Ok(worker)
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first word after `marker` in the log, once it appears.
    fn wait_log(&self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let output = self.output();
            if let Some((_, rest)) = output.split_once(marker) {
                return Ok(rest.split_whitespace().next().unwrap_or("").to_string());
            }
            ensure!(Instant::now() < deadline, "no '{marker}' in:\n{output}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sigterm(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -TERM failed: {status}");
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("worker still running after {timeout:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn scrape(&self, client: &Client) -> Result<String> {
        Ok(client
            .get(&self.metrics)
            .send()?
            .error_for_status()?
            .text()?)
    }

    /// Waits until the worker has run at least one denoising step of `request`.
    fn wait_first_step<T>(
        &self,
        client: &Client,
        request: &std::thread::JoinHandle<T>,
    ) -> Result<()> {
        let deadline = Instant::now() + START;
        while sample(
            &self.scrape(client)?,
            "fastfusion_worker_step_seconds_count",
        )
        .unwrap_or(0.0)
            < 1.0
        {
            ensure!(
                Instant::now() < deadline && !request.is_finished(),
                "no step ran:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway in front of `worker`.
fn gateway(worker: &Worker, dir: &tempfile::TempDir) -> Result<(Process, String)> {
    let config = write_tiny_config(dir.path(), json!({"max_steps": 1000}))?;
    let config_s = config.display().to_string();
    let data_s = dir.path().join("data").display().to_string();
    let mut process = Process::spawn(
        &binary("fastfusion-gateway")?,
        &["--worker", &worker.grpc],
        &[
            ("CONFIG_PATH", config_s.as_str()),
            ("IMAGE_DATA_PATH", data_s.as_str()),
            ("FASTFUSION_HOST", "127.0.0.1"),
            ("FASTFUSION_PORT", "0"),
        ],
    )?;
    let base = format!("http://{}", process.wait_listening(START)?);
    let client = Client::new();
    wait_http_ok(&client, &format!("{base}/ready"), START).with_context(|| process.output())?;
    Ok((process, base))
}

/// Posts a generation on another thread; joins to (status, body).
fn generate_in_background(base: &str, steps: u32) -> std::thread::JoinHandle<Result<(u16, Value)>> {
    let url = format!("{base}/v1/images/generations");
    std::thread::spawn(move || {
        let response = Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?
            .post(url)
            .json(
                &json!({"prompt": "a lighthouse", "size": "64x64", "seed": 3,
                "num_inference_steps": steps, "response_format": "b64_json"}),
            )
            .send()?;
        let status = response.status().as_u16();
        Ok((status, response.json()?))
    })
}

/// The value of an unlabelled series (or of the exact `name{labels}` given).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn metrics_move_and_sigterm_lets_the_running_request_finish() -> Result<()> {
    let mut worker = Worker::start(&[])?;
    let dir = tempfile::tempdir()?;
    let (_gateway, base) = gateway(&worker, &dir)?;
    let client = Client::new();

    let before = worker.scrape(&client)?;
    assert_eq!(
        sample(&before, "fastfusion_worker_queue_depth"),
        Some(0.0),
        "{before}"
    );
    assert!(sample(&before, "fastfusion_worker_model_load_seconds").is_some_and(|s| s > 0.0));
    assert_eq!(sample(&before, "fastfusion_worker_job_seconds_count"), None);

    let (status, body) = generate_in_background(&base, 3)
        .join()
        .map_err(|_| anyhow::anyhow!("request thread panicked"))??;
    assert_eq!(status, 200, "{body}");
    let after = worker.scrape(&client)?;
    for name in [
        "fastfusion_worker_queue_depth",
        "fastfusion_worker_batch_size",
        "fastfusion_worker_step_seconds",
        "fastfusion_worker_job_seconds",
        "fastfusion_worker_model_load_seconds",
    ] {
        assert!(
            after.contains(&format!("# HELP {name} ")),
            "{name} undescribed:\n{after}"
        );
    }
    assert_eq!(
        sample(&after, "fastfusion_worker_job_seconds_count"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "fastfusion_worker_batch_size_sum"),
        Some(1.0),
        "{after}"
    );
    // PNDM runs one extra step on its first; three requested steps are at least three.
    assert!(
        sample(&after, "fastfusion_worker_step_seconds_count").is_some_and(|n| n >= 3.0),
        "{after}"
    );
    assert!(
        after.contains("fastfusion_worker_job_seconds_bucket{le=\"600\"} 1"),
        "explicit buckets:\n{after}"
    );

    // A request long enough to be in flight when the signal arrives.
    let running = generate_in_background(&base, 12);
    let steps_before = sample(&after, "fastfusion_worker_step_seconds_count").unwrap_or(0.0);
    let deadline = Instant::now() + START;
    while sample(
        &worker.scrape(&client)?,
        "fastfusion_worker_step_seconds_count",
    )
    .unwrap_or(0.0)
        <= steps_before
    {
        ensure!(
            Instant::now() < deadline,
            "the second request never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    worker.sigterm()?;
    let (status, body) = running
        .join()
        .map_err(|_| anyhow::anyhow!("request thread panicked"))??;
    assert_eq!(status, 200, "the in-flight request finishes: {body}");
    assert!(body["data"][0]["b64_json"].is_string(), "{body}");
    let exit = worker.wait_exit(START)?;
    assert_eq!(exit.code(), Some(0), "{}", worker.output());
    assert!(
        worker
            .output()
            .contains("drained: every accepted job finished"),
        "{}",
        worker.output()
    );
    Ok(())
}

#[test]
fn sigterm_with_no_grace_cancels_a_long_request_and_exits_0() -> Result<()> {
    let mut worker = Worker::start(&[("FASTFUSION_DRAIN_GRACE_SECS", "0")])?;
    let dir = tempfile::tempdir()?;
    let (_gateway, base) = gateway(&worker, &dir)?;
    let client = Client::new();
    // Hundreds of steps: it can only end this soon by being cancelled.
    let running = generate_in_background(&base, 500);
    worker.wait_first_step(&client, &running)?;
    worker.sigterm()?;
    let exit = worker.wait_exit(Duration::from_secs(30))?;
    assert_eq!(exit.code(), Some(0), "{}", worker.output());
    let (status, body) = running
        .join()
        .map_err(|_| anyhow::anyhow!("request thread panicked"))??;
    assert_eq!(status, 503, "the cancelled request says so: {body}");
    assert!(
        worker.output().contains("grace period over"),
        "{}",
        worker.output()
    );
    Ok(())
}

/// `generate --out` without an image extension is refused by name before the model loads (it
/// used to run the whole generation and then fail as an internal error), and a `.png` works.
#[test]
fn generate_refuses_an_out_file_without_an_image_extension() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_tiny_config(dir.path(), json!({}))?;
    let run = |out: &str| {
        Command::new(binary("fastfusion-worker")?)
            .args(["--log-level", "error", "generate", "--config"])
            .arg(&config)
            .args([
                "--prompt",
                "a red cube",
                "--steps",
                "2",
                "--size",
                "64x64",
                "--out",
            ])
            .arg(dir.path().join(out))
            .output()
            .context("running fastfusion-worker generate")
    };
    let refused = run("picture")?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "exited with {}", refused.status);
    ensure!(
        stderr.contains("invalid value for 'out'") && stderr.contains("no image extension"),
        "{stderr}"
    );
    ensure!(!dir.path().join("picture").exists());
    let made = run("picture.png")?;
    ensure!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let image = image::open(dir.path().join("picture.png"))?;
    ensure!((image.width(), image.height()) == (64, 64));
    Ok(())
}
