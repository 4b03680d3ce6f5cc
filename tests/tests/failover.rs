//! The gateway in front of several real `fastfusion-worker serve` processes: routing by model
//! (names, an alias, the default, an unknown name), a worker SIGKILLed or drained (SIGTERM) in
//! the middle of a burst without losing a request, full workers (429) and dead ones (503).

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use fastfusion_tests::{
    binary, decode_image, fixture, max_pixel_diff, pixel_std, wait_http_ok, write_tiny_config,
    Process,
};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(60);

/// A worker process serving one fixture model under `name`.
struct Worker {
    process: Process,
    /// `127.0.0.1:PORT` of its gRPC server.
    grpc: String,
    /// Its Prometheus endpoint.
    metrics: String,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(name: &str, model: &str, pipeline: Value) -> Result<Worker> {
        let dir = tempfile::tempdir()?;
        let mut extra = json!({"hf_model_id": fixture(&format!("models/{model}"))});
        if let (Some(extra), Some(pipeline)) = (extra.as_object_mut(), pipeline.as_object()) {
            extra.extend(pipeline.clone());
        }
        let path = write_tiny_config(dir.path(), extra)?;
        rename_model(&path, name)?;
        let config = path.display().to_string();
        let mut process = Process::spawn(
            &binary("fastfusion-worker")?,
            &[
                "serve",
                "--config",
                &config,
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            &[],
        )?;
        let metrics = process.wait_for("metrics at ", START)?;
        let grpc = process.wait_listening(START)?;
        process.wait_for("model loaded", START)?;
        Ok(Worker {
            process,
            grpc,
            metrics,
            _dir: dir,
        })
    }

    /// Denoising steps this worker has run.
    fn steps(&self, client: &Client) -> Result<f64> {
        let text = client
            .get(&self.metrics)
            .send()?
            .error_for_status()?
            .text()?;
        Ok(text
            .lines()
            .find_map(|line| line.strip_prefix("fastfusion_worker_step_seconds_count "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0))
    }
}

/// Sets the config's `name`: what clients ask for in `model`.
fn rename_model(path: &Path, name: &str) -> Result<()> {
    let mut config: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    config["name"] = json!(name);
    std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// A gateway in front of `workers`, with extra flags.
struct Gateway {
    process: Process,
    base: String,
    client: Client,
    _data: tempfile::TempDir,
}

impl Gateway {
    fn start(workers: &[&Worker], flags: &[&str]) -> Result<Gateway> {
        let data = tempfile::tempdir()?;
        let data_s = data.path().display().to_string();
        let mut args: Vec<&str> = Vec::new();
        for worker in workers {
            args.extend(["--worker", worker.grpc.as_str()]);
        }
        args.extend_from_slice(flags);
        let mut process = Process::spawn(
            &binary("fastfusion-gateway")?,
            &args,
            &[
                ("IMAGE_DATA_PATH", data_s.as_str()),
                ("FASTFUSION_HOST", "127.0.0.1"),
                ("FASTFUSION_PORT", "0"),
            ],
        )?;
        let address = process.wait_listening(START)?;
        let gateway = Gateway {
            process,
            base: format!("http://{address}"),
            client: Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
            _data: data,
        };
        wait_http_ok(&gateway.client, &format!("{}/ready", gateway.base), START)?;
        Ok(gateway)
    }

    /// Waits until the gateway has seen `count` replicas answer their health check SERVING, so
    /// that balancing has all of them to choose from.
    fn wait_serving(&mut self, count: usize) -> Result<()> {
        let deadline = Instant::now() + START;
        loop {
            let output = self.process.output();
            let serving = output
                .lines()
                .filter(|l| l.contains("worker health changed") && l.contains("serving=true"))
                .count();
            if serving >= count {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{serving} of {count} workers serving:\n{output}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn generate(&self, body: &Value) -> Result<(u16, Option<String>, Value)> {
        post(&self.client, &self.base, body)
    }
}

/// POSTs a generation; returns status, Retry-After and the JSON body.
fn post(client: &Client, base: &str, body: &Value) -> Result<(u16, Option<String>, Value)> {
    let response = client
        .post(format!("{base}/v1/images/generations"))
        .json(body)
        .send()?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = response.text()?;
    let value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
    Ok((status, retry_after, value))
}

/// The one image of a 200 answer, decoded and checked to be a real picture.
fn image_of(status: u16, body: &Value) -> Result<image::RgbImage> {
    ensure!(status == 200, "status {status}: {body}");
    let b64 = body["data"][0]["b64_json"]
        .as_str()
        .context("no b64_json")?;
    let image = decode_image(&base64::engine::general_purpose::STANDARD.decode(b64)?)?;
    ensure!(image.dimensions() == (64, 64), "{:?}", image.dimensions());
    ensure!(pixel_std(&image) > 1.0, "a flat image");
    Ok(image)
}

/// A quick request: tiny, two steps, no classifier-free guidance (half the work).
fn small(prompt: &str, seed: u64) -> Value {
    json!({"prompt": prompt, "size": "64x64", "num_inference_steps": 2, "guidance_scale": 1.0,
           "seed": seed, "response_format": "b64_json"})
}

#[test]
fn requests_route_by_model_name_alias_and_default() -> Result<()> {
    let a = Worker::start("tiny-a", "tiny-sd15", json!({}))?;
    let v = Worker::start("tiny-v", "tiny-sd2-v", json!({}))?;
    let mut gw = Gateway::start(&[&a, &v], &["--model-alias", "dall-e-3=tiny-v"])?;
    gw.wait_serving(2)?;

    let models: Value = gw
        .client
        .get(format!("{}/v1/models", gw.base))
        .send()?
        .json()?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["tiny-a", "tiny-v"], "served models, default first");

    let with_model = |model: Option<&str>| -> Result<image::RgbImage> {
        let mut body = small("a lighthouse", 11);
        if let Some(model) = model {
            body["model"] = json!(model);
        }
        let (status, _, body) = gw.generate(&body)?;
        image_of(status, &body)
    };
    let from_a = with_model(Some("tiny-a"))?;
    let from_v = with_model(Some("tiny-v"))?;
    assert!(
        max_pixel_diff(&from_a, &from_v)? > 10,
        "two models, two pictures"
    );
    // Same seed, same model: the alias and the default land where they should.
    assert_eq!(max_pixel_diff(&with_model(Some("dall-e-3"))?, &from_v)?, 0);
    assert_eq!(max_pixel_diff(&with_model(None)?, &from_a)?, 0);

    let mut unknown = small("a lighthouse", 11);
    unknown["model"] = json!("gpt-image-1");
    let (status, _, body) = gw.generate(&unknown)?;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    let message = body["error"]["message"].as_str().context("message")?;
    assert!(message.contains("tiny-a, tiny-v"), "{message}");
    Ok(())
}

/// Sends 12 requests from 4 clients, calls `interrupt` once two have finished (while every
/// worker has work), and checks that every request got its image.
fn burst_survives(gw: &Gateway, interrupt: impl FnOnce() -> Result<()>) -> Result<()> {
    const CLIENTS: usize = 4;
    const EACH: u64 = 3;
    let (done_tx, done) = mpsc::channel();
    let mut clients = Vec::new();
    for c in 0..CLIENTS as u64 {
        let (client, base, done_tx) = (gw.client.clone(), gw.base.clone(), done_tx.clone());
        clients.push(std::thread::spawn(move || -> Result<Vec<(u16, Value)>> {
            let mut answers = Vec::new();
            for i in 0..EACH {
                let (status, _, body) = post(&client, &base, &small("a harbour", c * EACH + i))?;
                answers.push((status, body));
                let _ = done_tx.send(());
            }
            Ok(answers)
        }));
    }
    for _ in 0..2 {
        done.recv_timeout(START).context("no request finished")?;
    }
    interrupt()?;

    let mut ok = 0;
    for client in clients {
        let answers = match client.join() {
            Ok(answers) => answers?,
            Err(_) => bail!("a client thread panicked"),
        };
        for (status, body) in answers {
            image_of(status, &body)?;
            ok += 1;
        }
    }
    ensure!(ok == CLIENTS * EACH as usize, "{ok} images");
    Ok(())
}

#[test]
fn a_worker_killed_mid_burst_loses_no_request() -> Result<()> {
    let a = Worker::start("tiny-sd", "tiny-sd15", json!({}))?;
    let mut b = Worker::start("tiny-sd", "tiny-sd15", json!({}))?;
    let mut gw = Gateway::start(&[&a, &b], &[])?;
    gw.wait_serving(2)?;

    burst_survives(&gw, || {
        b.process.kill();
        Ok(())
    })?;
    let log = gw.process.output();
    assert!(
        log.contains("reason=\"unreachable\""),
        "the killed worker's requests were retried elsewhere:\n{log}"
    );
    Ok(())
}

#[test]
fn a_draining_worker_hands_new_requests_to_the_others() -> Result<()> {
    let a = Worker::start("tiny-sd", "tiny-sd15", json!({}))?;
    let mut b = Worker::start("tiny-sd", "tiny-sd15", json!({}))?;
    let mut gw = Gateway::start(&[&a, &b], &[])?;
    gw.wait_serving(2)?;

    // SIGTERM: B finishes what it accepted and refuses the rest (UNAVAILABLE) until it exits.
    let pid = b.process.id().to_string();
    burst_survives(&gw, || {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?;
        ensure!(status.success(), "kill -TERM failed: {status}");
        Ok(())
    })?;
    let deadline = Instant::now() + START;
    let exit = loop {
        if let Some(exit) = b.process.try_wait()? {
            break exit;
        }
        ensure!(Instant::now() < deadline, "B did not exit after draining");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "B drained and exited cleanly: {exit}");
    let log = b.process.output();
    assert!(log.contains("draining"), "{log}");
    Ok(())
}

#[test]
fn full_workers_are_429_and_dead_ones_503() -> Result<()> {
    // One request fills a worker; long ones keep them full while the test looks.
    let pipeline = json!({"max_queue": 1, "max_steps": 1000});
    let mut a = Worker::start("tiny-sd", "tiny-sd15", pipeline.clone())?;
    let mut b = Worker::start("tiny-sd", "tiny-sd15", pipeline)?;
    let mut gw = Gateway::start(&[&a, &b], &[])?;
    gw.wait_serving(2)?;

    let mut long = Vec::new();
    for seed in 0..2 {
        let (client, base) = (gw.client.clone(), gw.base.clone());
        let mut body = small("a long one", seed);
        body["num_inference_steps"] = json!(500);
        long.push(std::thread::spawn(move || post(&client, &base, &body)));
    }
    // Balancing spread them: both workers are denoising.
    let deadline = Instant::now() + START;
    while a.steps(&gw.client)? < 1.0 || b.steps(&gw.client)? < 1.0 {
        if let Some(at) = long.iter().position(|r| r.is_finished()) {
            let answer = long.swap_remove(at).join();
            bail!("a long request ended early: {answer:?}");
        }
        ensure!(
            Instant::now() < deadline,
            "both workers should be busy:\n{}",
            gw.process.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (status, retry_after, body) = gw.generate(&small("one too many", 3))?;
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    a.process.kill();
    b.process.kill();
    let (status, retry_after, body) = gw.generate(&small("nobody home", 4))?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert_eq!(body["error"]["code"], "service_unavailable");
    // The long requests end with their workers, one way or another.
    for request in long {
        let _ = request.join();
    }
    Ok(())
}
