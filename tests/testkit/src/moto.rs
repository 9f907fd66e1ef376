//! A real AWS API emulator: `moto_server` (PyPI `moto[server]`, installed into
//! `.venv` by `scripts/test.sh`) on 127.0.0.1, started and stopped by the
//! test, plus a helper that creates a Secrets Manager secret through moto's
//! HTTP API (the same JSON protocol the AWS SDK speaks).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::gitd::free_port;

const START_TIMEOUT: Duration = Duration::from_secs(60);

const NOT_FOUND: &str = "moto_server not found: the secret-mode tests need it; install the test tools with `bash scripts/test.sh` (it installs moto[server] into .venv)";

/// Dummy credentials and region for the AWS SDK pointed at moto.
pub const AWS_ACCESS_KEY_ID: &str = "testing";
pub const AWS_SECRET_ACCESS_KEY: &str = "testing";
pub const AWS_REGION: &str = "us-east-1";

/// The moto_server program: `$GITSTATE_MOTO_SERVER`, else `.venv/bin/moto_server`.
pub fn moto_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GITSTATE_MOTO_SERVER") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "GITSTATE_MOTO_SERVER={} is not a file. {NOT_FOUND}", p.display());
        return p;
    }
    let p = crate::repo_root().join(".venv/bin/moto_server");
    assert!(p.is_file(), "{NOT_FOUND}");
    p
}

/// A running `moto_server` on 127.0.0.1; killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Moto {
    /// Start moto_server on a free loopback port and wait until it answers.
    pub fn start() -> Moto {
        let bin = moto_server_bin();
        let dir = tempfile::Builder::new().prefix("gitstate-moto-").tempdir().unwrap();
        for _ in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
            let child = Command::new(&bin)
                .arg("-H")
                .arg("127.0.0.1")
                .arg("-p")
                .arg(port.to_string())
                .current_dir(dir.path())
                .env("HOME", dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}. {NOT_FOUND}", bin.display()));
            let mut child = child;
            if wait_ready(&mut child, port) {
                return Moto { child, port, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "moto_server did not start:\n{}",
            std::fs::read_to_string(dir.path().join("moto.log")).unwrap_or_default()
        );
    }

    /// `http://127.0.0.1:PORT`: the value of `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The environment the AWS SDK needs to talk to this emulator only.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ACCESS_KEY_ID".into(), AWS_ACCESS_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), AWS_SECRET_ACCESS_KEY.into()),
            ("AWS_REGION".into(), AWS_REGION.into()),
            ("AWS_DEFAULT_REGION".into(), AWS_REGION.into()),
            // No shared config or credentials files of the machine.
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// What moto_server printed so far (one line per request it served).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// Create the Secrets Manager secret `name` holding `value` (a string,
    /// usually JSON) and return its ARN.
    pub fn create_secret(&self, name: &str, value: &str) -> String {
        let body = serde_json::json!({ "Name": name, "SecretString": value });
        let out = self.secretsmanager("CreateSecret", &body);
        out["ARN"].as_str().unwrap_or_else(|| panic!("CreateSecret answered without ARN: {out}")).to_string()
    }

    /// The current value of secret `id` (name or ARN), as moto stores it.
    pub fn get_secret(&self, id: &str) -> String {
        let out = self.secretsmanager("GetSecretValue", &serde_json::json!({ "SecretId": id }));
        out["SecretString"].as_str().unwrap_or_default().to_string()
    }

    /// Call Secrets Manager action `action` with a JSON body; panics unless 200.
    pub fn secretsmanager(&self, action: &str, body: &serde_json::Value) -> serde_json::Value {
        let target = format!("secretsmanager.{action}");
        // moto tells services apart by the credential scope of the
        // signature; it does not check the signature itself.
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={AWS_ACCESS_KEY_ID}/20240101/{AWS_REGION}/secretsmanager/aws4_request, SignedHeaders=host;x-amz-target, Signature=0000"
        );
        let bytes = serde_json::to_vec(body).unwrap();
        let (status, resp) = raw_request(
            self.port,
            "POST",
            "/",
            &[("Content-Type", "application/x-amz-json-1.1"), ("X-Amz-Target", &target), ("Authorization", &auth)],
            &bytes,
        )
        .unwrap_or_else(|e| panic!("{action} to moto_server: {e}"));
        assert_eq!(status, 200, "{action} to moto_server: {}", String::from_utf8_lossy(&resp));
        serde_json::from_slice(&resp)
            .unwrap_or_else(|e| panic!("{action}: not JSON ({e}): {}", String::from_utf8_lossy(&resp)))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- moto_server on 127.0.0.1:{} log ---\n{}", self.port, self.log());
        }
    }
}

/// One HTTP/1.0 request on a fresh connection: (status, body).
fn raw_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let split =
        resp.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    Ok((status, resp[split + 4..].to_vec()))
}

fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok((200, _)) = raw_request(port, "GET", "/moto-api/", &[], b"") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

// ---------------------------------------------------------------------------
// KMS (encryption at rest, tests/encryption.rs)
// ---------------------------------------------------------------------------

impl Moto {
    /// Create a symmetric encryption key (`SYMMETRIC_DEFAULT`, `ENCRYPT_DECRYPT`) in moto's
    /// KMS and return its ARN.
    pub fn create_kms_key(&self, description: &str) -> String {
        let out = self.kms(
            "CreateKey",
            &serde_json::json!({
                "Description": description,
                "KeyUsage": "ENCRYPT_DECRYPT",
                "KeySpec": "SYMMETRIC_DEFAULT",
            }),
        );
        out["KeyMetadata"]["Arn"]
            .as_str()
            .unwrap_or_else(|| panic!("CreateKey answered without KeyMetadata.Arn: {out}"))
            .to_string()
    }

    /// KMS `Decrypt` of a `CiphertextBlob` given in base64 (as the JSON protocol carries
    /// blobs): the plaintext, in base64.
    pub fn kms_decrypt_base64(&self, ciphertext_blob: &str) -> String {
        let out = self.kms("Decrypt", &serde_json::json!({ "CiphertextBlob": ciphertext_blob }));
        out["Plaintext"].as_str().unwrap_or_else(|| panic!("Decrypt answered without Plaintext: {out}")).to_string()
    }

    /// Call KMS action `action` (`CreateKey`, `Decrypt`, ...) with a JSON body; panics unless 200.
    pub fn kms(&self, action: &str, body: &serde_json::Value) -> serde_json::Value {
        let target = format!("TrentService.{action}");
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={AWS_ACCESS_KEY_ID}/20240101/{AWS_REGION}/kms/aws4_request, SignedHeaders=host;x-amz-target, Signature=0000"
        );
        let bytes = serde_json::to_vec(body).unwrap();
        let (status, resp) = raw_request(
            self.port,
            "POST",
            "/",
            &[("Content-Type", "application/x-amz-json-1.1"), ("X-Amz-Target", &target), ("Authorization", &auth)],
            &bytes,
        )
        .unwrap_or_else(|e| panic!("KMS {action} to moto_server: {e}"));
        assert_eq!(status, 200, "KMS {action} to moto_server: {}", String::from_utf8_lossy(&resp));
        serde_json::from_slice(&resp)
            .unwrap_or_else(|e| panic!("KMS {action}: not JSON ({e}): {}", String::from_utf8_lossy(&resp)))
    }
}
