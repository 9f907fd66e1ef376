//! Headless Chromium from Debian (`chromium`, `chromium-driver`) driven over the W3C WebDriver
//! protocol: a few JSON requests to chromedriver, so no browser-automation crate is needed.
//! Each [`Browser`] has its own chromedriver, profile directory and session; dropped, it ends them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tempfile::TempDir;

use super::gitd::free_port;

const NOT_FOUND: &str = "run `bash scripts/test.sh` (it installs chromium and chromium-driver from Debian)";
/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `$name` if set, else the first of `candidates` that exists.
fn find_binary(name: &str, candidates: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(name) {
        return PathBuf::from(p);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{} not found ({name}): {NOT_FOUND}", candidates[0]))
}

/// A headless Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: TempDir,
    agent: ureq::Agent,
}

impl Browser {
    /// Start chromedriver and a headless Chromium with a fresh profile.
    pub fn start() -> Browser {
        let chromium = find_binary("GITSTATE_CHROMIUM", &["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
        let driver_bin =
            find_binary("GITSTATE_CHROMEDRIVER", &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}; {NOT_FOUND}", driver_bin.display()));
        let profile = tempfile::Builder::new().prefix("gitstate-chromium-").tempdir().unwrap();
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser { driver, base, session: String::new(), _profile: profile, agent };
        browser.wait_ready();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1200,1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", browser._profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let answer = browser.call("POST", "/session", Some(caps));
        browser.session = answer["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}")).to_string();
        browser
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.agent.get(&format!("{}/status", self.base)).call() {
                let v: Value = serde_json::from_str(&r.into_string().unwrap_or_default()).unwrap_or_default();
                if v["value"]["ready"] == true {
                    return;
                }
            }
            if let Ok(Some(status)) = self.driver.try_wait() {
                panic!("chromedriver exited: {status}");
            }
            assert!(Instant::now() < deadline, "chromedriver did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One WebDriver command; its `value`. Panics on an error answer.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let req = self.agent.request(method, &url);
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
            None => req.call(),
        };
        let answer: Value = match result {
            Ok(r) => serde_json::from_str(&r.into_string().unwrap_or_default()).unwrap_or_default(),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                panic!("WebDriver {method} {path}: HTTP {code}: {text}");
            }
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        };
        answer.get("value").cloned().unwrap_or(answer)
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Load `url` and wait for it.
    pub fn goto(&self, url: &str) {
        self.call("POST", &self.session_path("/url"), Some(json!({"url": url})));
    }

    pub fn title(&self) -> String {
        self.call("GET", &self.session_path("/title"), None).as_str().unwrap_or_default().to_string()
    }

    /// Wait up to 10 s for `done` to hold: a click on a form's button returns before the
    /// browser has loaded the page the form's POST redirects to.
    pub fn wait_until(&self, what: &str, done: impl Fn(&Browser) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(Instant::now() < deadline, "waited 10 s for {what}; the page is:\n{}", self.source());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn current_url(&self) -> String {
        self.call("GET", &self.session_path("/url"), None).as_str().unwrap_or_default().to_string()
    }

    /// The page's HTML as the browser holds it.
    pub fn source(&self) -> String {
        self.call("GET", &self.session_path("/source"), None).as_str().unwrap_or_default().to_string()
    }

    /// The first element matching the CSS `selector`.
    pub fn find(&self, selector: &str) -> Element<'_> {
        let v = self.call(
            "POST",
            &self.session_path("/element"),
            Some(json!({"using": "css selector", "value": selector})),
        );
        Element {
            browser: self,
            id: v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {selector}: {v}")).into(),
        }
    }

    /// The first link whose text is `text`.
    pub fn link(&self, text: &str) -> Element<'_> {
        let v = self.call("POST", &self.session_path("/element"), Some(json!({"using": "link text", "value": text})));
        Element { browser: self, id: v[ELEMENT].as_str().unwrap_or_else(|| panic!("no link {text:?}: {v}")).into() }
    }

    /// Run `script` in the page (WebDriver's own channel, not the page's) and return its value.
    pub fn eval(&self, script: &str) -> Value {
        self.call("POST", &self.session_path("/execute/sync"), Some(json!({"script": script, "args": []})))
    }

    /// Resize the window (a phone is about 390 × 844).
    pub fn set_window(&self, width: u32, height: u32) {
        self.call("POST", &self.session_path("/window/rect"), Some(json!({"width": width, "height": height})));
    }

    /// A PNG of the viewport, written to `file`.
    pub fn screenshot(&self, file: &Path) {
        let b64 = self.call("GET", &self.session_path("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).expect("a PNG");
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(file, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.agent.delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// An element of the page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Element<'_> {
    fn path(&self, rest: &str) -> String {
        self.browser.session_path(&format!("/element/{}{rest}", self.id))
    }

    pub fn text(&self) -> String {
        self.browser.call("GET", &self.path("/text"), None).as_str().unwrap_or_default().to_string()
    }

    pub fn click(&self) {
        self.browser.call("POST", &self.path("/click"), Some(json!({})));
    }

    pub fn type_text(&self, text: &str) {
        self.browser.call("POST", &self.path("/value"), Some(json!({"text": text})));
    }
}
