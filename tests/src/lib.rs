//! Shared helpers for the end-to-end tests: they start the real `fastfusion-gateway` and
//! `fastfusion-worker` binaries on ephemeral ports and talk to them over HTTP.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executables
//! (`target/<profile>/`). Every process is killed when its [`Process`] is dropped, so a failing test
//! leaves nothing running.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `tests/fixtures/...`
pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

/// Path of a workspace binary built by `cargo test --workspace` (same profile as this test).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-exe> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        bail!(
            "{} is not built; run the tests with `cargo test --workspace` (it builds every binary)",
            path.display()
        );
    }
    Ok(path)
}

/// A model_config.json for the tiny fixture model, written into `dir`.
pub fn write_tiny_config(dir: &Path, extra_pipeline: serde_json::Value) -> Result<PathBuf> {
    let mut pipeline = serde_json::json!({
        "hf_model_id": fixture("models/tiny-sd15"),
        "max_n": 3,
        "torch_dtype_init": "float32",
        "torch_dtype_run": "float32",
        "torch_device": "cpu",
        "enable_cpu_offload": false,
        "enable_vae_slicing": false,
        "enable_vae_tiling": false,
        "global_guidance_scale": 7.5,
        "global_num_inference_steps": 3,
        "max_pixels": 128 * 128,
        "generations_config": {"enabled": true},
        "edits_config": {"enabled": false},
        "variations_config": {"enabled": false}
    });
    if let (Some(base), Some(extra)) = (pipeline.as_object_mut(), extra_pipeline.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    let config = serde_json::json!({
        "name": "tiny-sd",
        "pipeline": pipeline,
        "generation_presets": {
            "standard": {"guidance_scale": 7.5, "num_inference_steps": 3},
            "hd": {"guidance_scale": 5.0, "num_inference_steps": 4},
            "fast": {"guidance_scale": 1.0, "num_inference_steps": 2}
        }
    });
    let path = dir.join("model_config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    Ok(path)
}

/// A child process that is killed on drop; its output lines are kept for diagnostics.
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    name: String,
}

impl Process {
    /// Starts `program` with `args` and `envs`, stdout and stderr captured.
    pub fn spawn(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Result<Process> {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A stray variable from the developer's shell must not change what the test starts.
        for (var, _) in std::env::vars_os() {
            let name = var.to_string_lossy();
            let ours = ["FASTFUSION_", "OTEL_", "AWS_", "HF_"]
                .iter()
                .any(|prefix| name.starts_with(prefix));
            if ours || ["BASE_URL", "CONFIG_PATH", "IMAGE_DATA_PATH"].contains(&name.as_ref()) {
                command.env_remove(&var);
            }
        }
        command
            .env("FASTFUSION_LOGLEVEL", "info")
            .env("NO_COLOR", "1");
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let (tx, lines) = mpsc::channel();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Process {
            child,
            lines,
            seen: Vec::new(),
            name,
        })
    }

    /// Waits for an output line containing `marker` and returns the text after it.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line
                        .find(marker)
                        .map(|i| line[i + marker.len()..].trim().to_string());
                    self.seen.push(line);
                    if let Some(rest) = found {
                        return Ok(rest);
                    }
                }
                Err(_) => {
                    let output = self.output();
                    bail!(
                        "{} did not print '{marker}' within {timeout:?}; output:\n{output}",
                        self.name
                    )
                }
            }
        }
    }

    /// The address from a `listening on ...` log line (`http://` prefix stripped).
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<String> {
        let rest = self.wait_for("listening on ", timeout)?;
        let addr = rest.trim_start_matches("http://");
        // Text logs end the address at a space, JSON logs at the closing quote.
        let addr = addr
            .split(|c: char| c.is_whitespace() || c == '"')
            .next()
            .unwrap_or(addr);
        Ok(addr.trim_end_matches(['"', '\'', ',', '}']).to_string())
    }

    /// Everything printed so far.
    pub fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// Whether the process has exited, and how.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// The OS process id, e.g. to send it a signal with `kill`.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM-equivalent (kill) and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `url` until it answers 200 or `timeout` passes.
pub fn wait_http_ok(
    client: &reqwest::blocking::Client,
    url: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.get(url).send() {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("status {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{url} not ready within {timeout:?}: {last}")
}

/// Decodes an image and checks it is not flat (a real generated picture has variance).
pub fn decode_image(bytes: &[u8]) -> Result<image::RgbImage> {
    Ok(image::load_from_memory(bytes)?.to_rgb8())
}

/// Per-channel standard deviation of all pixels, averaged.
pub fn pixel_std(img: &image::RgbImage) -> f64 {
    let n = (img.width() * img.height()) as f64;
    let mut total = 0.0;
    for c in 0..3 {
        let values: Vec<f64> = img.pixels().map(|p| f64::from(p.0[c])).collect();
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        total += var.sqrt();
    }
    total / 3.0
}

/// Largest per-channel difference between two images of the same size.
pub fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> Result<u8> {
    if a.dimensions() != b.dimensions() {
        bail!("sizes differ: {:?} vs {:?}", a.dimensions(), b.dimensions());
    }
    Ok(a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0))
}

/// One part of a `multipart/form-data` body: a text field, or a file with its bytes.
pub enum FormPart<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a [u8]),
}

/// A `multipart/form-data` body as curl `-F` sends it; returns (Content-Type, body). Built by
/// hand so the tests need no HTTP client feature for it and control every byte clients send.
pub fn multipart_body(parts: &[FormPart<'_>]) -> (String, Vec<u8>) {
    const BOUNDARY: &str = "----fastfusion-e2e-boundary";
    let mut body = Vec::new();
    for part in parts {
        match part {
            FormPart::Text(name, value) => body.extend_from_slice(
                format!(
                    "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            ),
            FormPart::File(name, bytes) => {
                body.extend_from_slice(
                    format!(
                        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                         filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

/// Encodes an image as PNG bytes.
pub fn encode_png<P, C>(image: &image::ImageBuffer<P, C>) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// A `fastfusion-gateway` process with its embedded worker, serving one model config, with its
/// own config and image directories (removed with it).
pub struct Gateway {
    pub base: String,
    pub process: Process,
    pub client: reqwest::blocking::Client,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Gateway {
    /// How long the model may take to load.
    const START: Duration = Duration::from_secs(90);

    /// Starts the gateway on the tiny SD model; `pipeline` is merged into its `pipeline` config.
    pub fn start_tiny(pipeline: serde_json::Value) -> Result<Gateway> {
        let config_dir = tempfile::tempdir()?;
        let config = write_tiny_config(config_dir.path(), pipeline)?;
        Self::start_in(config_dir, &config)
    }

    /// Starts the gateway on a whole `model_config.json`.
    pub fn start_with(config: &serde_json::Value) -> Result<Gateway> {
        let config_dir = tempfile::tempdir()?;
        let path = config_dir.path().join("model_config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(config)?)?;
        Self::start_in(config_dir, &path)
    }

    /// Starts the gateway on an existing config file (the repository's own `model_config.json`,
    /// as the README's run command serves it).
    pub fn start_on_file(config: &Path) -> Result<Gateway> {
        Self::start_in(tempfile::tempdir()?, config)
    }

    fn start_in(config_dir: tempfile::TempDir, config: &Path) -> Result<Gateway> {
        let data_dir = tempfile::tempdir()?;
        let config = config.display().to_string();
        let data = data_dir.path().display().to_string();
        let mut process = Process::spawn(
            &binary("fastfusion-gateway")?,
            &[],
            &[
                ("CONFIG_PATH", config.as_str()),
                ("IMAGE_DATA_PATH", data.as_str()),
                ("FASTFUSION_HOST", "127.0.0.1"),
                ("FASTFUSION_PORT", "0"),
            ],
        )?;
        let addr = process.wait_listening(Self::START)?;
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let mut gateway = Gateway {
            base: format!("http://{addr}"),
            process,
            client,
            _dirs: (config_dir, data_dir),
        };
        let ready = format!("{}/ready", gateway.base);
        wait_http_ok(&gateway.client, &ready, Self::START)
            .with_context(|| gateway.process.output())?;
        Ok(gateway)
    }

    /// POSTs a JSON body; returns the status and the JSON answer.
    pub fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()?;
        let status = response.status().as_u16();
        let text = response.text()?;
        let value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
        Ok((status, value))
    }

    /// POSTs a multipart body as curl `-F` does; returns the status and the JSON answer.
    pub fn post_form(
        &self,
        path: &str,
        parts: &[FormPart<'_>],
    ) -> Result<(u16, serde_json::Value)> {
        let (content_type, body) = multipart_body(parts);
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()?;
        let status = response.status().as_u16();
        let text = response.text()?;
        let value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
        Ok((status, value))
    }

    /// The first image of a successful `b64_json` answer; otherwise an error with the gateway's
    /// output.
    pub fn first_image(
        &mut self,
        status: u16,
        body: &serde_json::Value,
    ) -> Result<image::RgbImage> {
        if status != 200 {
            bail!("status {status}: {body}\n{}", self.process.output());
        }
        let b64 = body["data"][0]["b64_json"]
            .as_str()
            .context("no b64_json")?;
        use base64::Engine as _;
        decode_image(&base64::engine::general_purpose::STANDARD.decode(b64)?)
    }
}
