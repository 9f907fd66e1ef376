//! A git server that is not git's own: dulwich (PyPI, installed into `.venv` by
//! `scripts/test.sh`), over git:// or smart HTTP, serving the bare repositories of a
//! temporary directory with push enabled (`python/dulwich_server.py`). Killed on drop.
//!
//! dulwich's receive-pack is not a compare-and-swap (it reports `ok` for a command whose
//! old id is stale): lock conflicts cannot be tested on it, and `gitstate doctor` says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::gitd::{free_port, git, wait_until_listening};

const NOT_FOUND: &str =
    "the dulwich git server needs Python with dulwich in .venv; install the test tools with `bash scripts/test.sh`";

/// The Python that has dulwich: `$GITSTATE_PYTHON`, else `.venv/bin/python`.
pub fn python_bin() -> PathBuf {
    let p = std::env::var_os("GITSTATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(".venv/bin/python"));
    assert!(p.is_file(), "{} is not a file. {NOT_FOUND}", p.display());
    let ok = Command::new(&p).args(["-c", "import dulwich"]).status().is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import dulwich. {NOT_FOUND}", p.display());
    p
}

/// Which protocol the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Git,
    Http,
}

/// A running dulwich server on 127.0.0.1.
pub struct DulwichServer {
    child: Child,
    port: u16,
    dialect: Dialect,
    dir: TempDir,
}

impl DulwichServer {
    pub fn start(dialect: Dialect) -> Self {
        let python = python_bin();
        let script = crate::repo_root().join("tests/testkit/python/dulwich_server.py");
        let dir = tempfile::Builder::new().prefix("gitstate-dulwich-").tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        let mode = match dialect {
            Dialect::Git => "git",
            Dialect::Http => "http",
        };
        for _ in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("dulwich.log")).unwrap();
            let mut child = Command::new(&python)
                .arg(&script)
                .arg(mode)
                // dulwich joins the request's path (`/x.git`, absolute) to its root: serve from
                // `/`, and name repositories by their whole path (see `url`).
                .arg("/")
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}. {NOT_FOUND}", python.display()));
            if wait_until_listening(&mut child, port) {
                return DulwichServer { child, port, dialect, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "dulwich did not start:\n{}",
            std::fs::read_to_string(dir.path().join("dulwich.log")).unwrap_or_default()
        );
    }

    /// Create the bare repository `name` (branch `main`, empty) and return its URL.
    pub fn create_repo(&self, name: &str) -> String {
        let path = self.repo_dir(name);
        git(self.dir.path(), &["init", "--bare", "-q", "-b", "main", &path.display().to_string()]);
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        let path = self.repo_dir(name).display().to_string();
        match self.dialect {
            Dialect::Git => format!("git://127.0.0.1:{}{path}", self.port),
            Dialect::Http => format!("http://127.0.0.1:{}{path}", self.port),
        }
    }

    pub fn repo_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("repos").join(name)
    }

    pub fn base_dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server printed (its request log and tracebacks).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dulwich.log")).unwrap_or_default()
    }
}

impl Drop for DulwichServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
