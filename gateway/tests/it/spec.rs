//! The committed spec matches the code, and an SDK generated from it drives the main flow.

use std::path::{Path, PathBuf};
use std::process::Command;

use redpacket_common::auth::Role;

use crate::system::{System, token};

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn the_committed_spec_is_what_the_code_serves() {
    let committed = std::fs::read_to_string(repository_root().join("openapi.json"))
        .expect("openapi.json at the repository root");
    let generated = redpacket_gateway::spec_json();
    assert!(
        committed == generated,
        "openapi.json is out of date; regenerate it with \
         `cargo run -p redpacket -- openapi > openapi.json` and commit it"
    );
}

#[tokio::test]
async fn a_python_sdk_generated_from_the_spec_drives_the_main_flow() {
    let out = std::env::temp_dir().join(format!("rp-sdk-{}", uuid::Uuid::new_v4().simple()));
    let generated = Command::new("openapi-python-client")
        .args(["generate", "--path"])
        .arg(repository_root().join("openapi.json"))
        .arg("--output-path")
        .arg(&out)
        .output()
        .expect(
            "openapi-python-client must be installed (`pip install openapi-python-client`; \
             scripts/test.sh does it)",
        );
    assert!(
        generated.status.success(),
        "SDK generation failed:\n{}\n{}",
        String::from_utf8_lossy(&generated.stdout),
        String::from_utf8_lossy(&generated.stderr)
    );
    let warnings = String::from_utf8_lossy(&generated.stdout).to_lowercase();
    assert!(
        !warnings.contains("warning"),
        "the generator skipped parts of the spec:\n{warnings}"
    );

    let system = System::start().await;
    let users: Vec<String> = (0..4)
        .map(|i| token(Role::User, &format!("sdk-user-{i}")))
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/main_flow.py");
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .arg(&system.gateway.url)
        .arg(token(Role::Operator, "ops"))
        .arg(token(Role::Merchant, "sdk-shop"))
        .arg("sdk-shop")
        .args(&users)
        .env("PYTHONPATH", &out)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        run.status.success(),
        "the SDK flow failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
