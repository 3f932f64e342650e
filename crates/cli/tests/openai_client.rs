//! Starts `augur serve` on 127.0.0.1 with the default model and runs tests/server/test_openai.py
//! (the official `openai` Python client) against it. Needs `pip install openai pytest`; without
//! them the test says so and passes, unless AUGUR_REQUIRE_OPENAI=1 (set by .ci/run) makes that a
//! failure.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use augur_models::hub;

#[test]
fn official_openai_client_against_augur_serve() {
    let has_client = Command::new("python3").args(["-c", "import openai, pytest"]).status().is_ok_and(|s| s.success());
    if !has_client {
        assert!(std::env::var("AUGUR_REQUIRE_OPENAI").is_err(), "AUGUR_REQUIRE_OPENAI is set but `openai`/`pytest` are not installed");
        eprintln!("skipping: `python3 -m pip install openai pytest` to run the OpenAI client tests");
        return;
    }
    let model = std::env::var("AUGUR_MODEL").unwrap_or_else(|_| hub::ensure_default_model().unwrap().display().to_string());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let key = "test-key-123";
    let mut server = Command::new(env!("CARGO_BIN_EXE_augur"))
        .args(["serve", "-m", &model, "--port", &port.to_string(), "--api-key", key, "--model-name", "augur"])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start augur serve");
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/server/test_openai.py");
    let status = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&script)
        .env("AUGUR_SERVER_URL", &url)
        .env("AUGUR_API_KEY", key)
        .status()
        .expect("run pytest");
    // Graceful shutdown on SIGTERM.
    let _ = Command::new("kill").args(["-TERM", &server.id().to_string()]).status();
    let t1 = Instant::now();
    loop {
        if let Some(code) = server.try_wait().unwrap() {
            assert!(code.success(), "server exited with {code}");
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(15), "server did not shut down on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(status.success(), "OpenAI client tests failed");
}
