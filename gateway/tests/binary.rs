//! The `fastfusion-gateway` binary itself: start-up validation, the `listening on` line with the
//! real port when FASTFUSION_PORT=0, serving, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_fastfusion-gateway");

/// The gateway with a clean environment (the seed's variables could leak in from the shell).
fn gateway(args: &[&str], data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(BINARY);
    for variable in [
        "FASTFUSION_HOST",
        "FASTFUSION_PORT",
        "BASE_URL",
        "CONFIG_PATH",
        "FASTFUSION_WORKERS",
        "FASTFUSION_LOGLEVEL",
        "RUST_LOG",
    ] {
        command.env_remove(variable);
    }
    command
        .env("IMAGE_DATA_PATH", data_dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Reads stdout until the `listening on http://ADDR` line and returns ADDR.
fn listening_address(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some((_, address)) = line.split_once("listening on http://") {
            return address.trim().to_string();
        }
    }
    panic!("no 'listening on' line");
}

fn http_get(address: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

#[test]
fn serves_on_an_ephemeral_port_and_stops_on_sigterm() {
    let data = tempfile::tempdir().expect("tempdir");
    // A worker endpoint nobody listens on: liveness must not depend on it.
    let mut child = gateway(
        &[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--worker",
            "127.0.0.1:9",
        ],
        data.path(),
    )
    .spawn()
    .expect("spawn");
    let address = listening_address(&mut child);
    assert!(!address.ends_with(":0"), "{address}");

    let health = http_get(&address, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains(r#"{"status":"ok"}"#), "{health}");
    let ready = http_get(&address, "/ready");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            assert!(exit.success(), "{exit:?}");
            break;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_settings_stop_start_up_naming_the_setting() {
    let data = tempfile::tempdir().expect("tempdir");
    let output = gateway(&["--worker", "127.0.0.1:9"], data.path())
        .env("BASE_URL", "example.com")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("BASE_URL"), "{stderr}");

    let file = data.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let output = gateway(&["--worker", "127.0.0.1:9"], &file)
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("IMAGE_DATA_PATH"), "{stderr}");
}
