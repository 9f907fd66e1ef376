//! A real OpenSSH server (Debian `openssh-server`, `/usr/sbin/sshd -D -e -f <config>`) on
//! 127.0.0.1 serving bare repositories of a temporary directory through `git-upload-pack`
//! and `git-receive-pack`, with its own host key and an `authorized_keys` made by
//! `ssh-keygen`. Only tests run sshd, ssh-keygen and git; gitstate itself runs neither.

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::gitd::{free_port, git, git_out, require_git, signal_group, wait_until_listening};

const NOT_FOUND: &str = "OpenSSH's sshd or ssh-keygen not found (/usr/sbin/sshd, ssh-keygen on PATH): the SSH git host of the tests needs them; install the test tools with `bash scripts/test.sh`";

/// The sshd binary: `$GITSTATE_SSHD`, else `/usr/sbin/sshd` (Debian's place), else `sshd` on `PATH`.
pub fn sshd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GITSTATE_SSHD") {
        return PathBuf::from(p);
    }
    let debian = PathBuf::from("/usr/sbin/sshd");
    if debian.is_file() {
        return debian;
    }
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("sshd"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

/// A key pair made by `ssh-keygen` (ed25519, no passphrase).
#[derive(Clone, Debug)]
pub struct KeyPair {
    /// The private key file's text (OpenSSH format).
    pub private: String,
    /// The `.pub` line: `ssh-ed25519 AAAA… comment`.
    pub public: String,
    /// The private key file.
    pub path: PathBuf,
}

impl KeyPair {
    /// A fresh pair in `dir` named `name` (`-t kind`: `ed25519`, `ecdsa`, `rsa`).
    pub fn generate(dir: &Path, name: &str, kind: &str) -> KeyPair {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("pub"));
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-C", name, "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{NOT_FOUND} ({e})"));
        assert!(out.status.success(), "ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        let private = std::fs::read_to_string(&path).expect("read the private key");
        let public = std::fs::read_to_string(format!("{}.pub", path.display())).expect("read the public key");
        KeyPair { private, public: public.trim().to_owned(), path }
    }

    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen").arg("-lf").arg(format!("{}.pub", self.path.display())).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace().nth(1).expect("ssh-keygen -l prints the fingerprint second").to_owned()
    }

    /// The key type and base64, without the comment: what a known_hosts line pins.
    pub fn public_key(&self) -> String {
        self.public.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }
}

/// A running sshd on 127.0.0.1 in a process group of its own; stopped on drop.
pub struct Sshd {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    host_key: KeyPair,
    /// A second host key sshd also offers ([`Sshd::start_with_rsa_host_key`]).
    second_host_key: Option<KeyPair>,
    client_key: KeyPair,
}

impl Sshd {
    /// Start sshd with a fresh host key, one authorized client key, and no repositories yet.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Like [`Sshd::start`], with an RSA host key offered beside the ed25519 one.
    pub fn start_with_rsa_host_key() -> Self {
        Self::start_with(true)
    }

    fn start_with(rsa_host_key: bool) -> Self {
        require_git();
        let bin = sshd_bin();
        let dir = tempfile::Builder::new().prefix("gitstate-sshd-").tempdir().expect("create a temporary directory");
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        // sshd's privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let host_key = KeyPair::generate(dir.path(), "host_ed25519", "ed25519");
        let client_key = KeyPair::generate(dir.path(), "client_ed25519", "ed25519");
        let second_host_key = rsa_host_key.then(|| KeyPair::generate(dir.path(), "host_rsa", "rsa"));
        std::fs::write(dir.path().join("authorized_keys"), format!("{}\n", client_key.public)).unwrap();
        let mut sshd = Sshd { child: None, port: 0, dir, host_key, second_host_key, client_key };
        for _ in 0..5 {
            sshd.port = free_port();
            if sshd.spawn(&bin) {
                return sshd;
            }
        }
        panic!("sshd did not start:\n{}", sshd.log());
    }

    fn spawn(&mut self, bin: &Path) -> bool {
        let d = self.dir.path();
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
             AcceptEnv GIT_PROTOCOL\nMaxStartups 200\nLogLevel VERBOSE\n",
            port = self.port,
            d = d.display()
        );
        let mut config = config;
        if let Some(key) = &self.second_host_key {
            config.push_str(&format!("HostKey {}\n", key.path.display()));
        }
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let log = File::options().create(true).append(true).open(d.join("sshd.log")).unwrap();
        let mut child = Command::new(bin)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{NOT_FOUND} ({e})"));
        if wait_until_listening(&mut child, self.port) {
            self.child = Some(child);
            return true;
        }
        signal_group(child.id(), "KILL");
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Stop sshd and every session it runs (each a process group of its own, found by its
    /// parent's id); returns once the port refuses connections and the sessions are gone.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        for session in children_of(child.id()) {
            signal_group(session, "KILL");
            let _ = Command::new("kill").args(["-KILL", &session.to_string()]).stderr(Stdio::null()).status();
        }
        signal_group(child.id(), "KILL");
        let _ = child.kill();
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start sshd again on the same port, with the same keys and repositories.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running sshd (stop it first)");
        let bin = sshd_bin();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn(&bin) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("sshd did not restart on port {}:\n{}", self.port, self.log());
    }

    /// How many times sshd accepted a key (one per SSH session set up).
    pub fn sessions_accepted(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }

    /// The user sshd lets in (the one running the tests).
    pub fn user(&self) -> String {
        let out = Command::new("id").arg("-un").output().expect("run id -un");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Create the bare repository `name` and return its `ssh://` URL.
    pub fn create_repo(&self, name: &str) -> String {
        let path = self.repo_dir(name);
        git(self.dir.path(), &["init", "--bare", "-q", "-b", "main", &path.display().to_string()]);
        git_out(&path, &["config", "receive.fsckObjects", "true"]);
        self.url(name)
    }

    /// The `ssh://` URL of repository `name`.
    pub fn url(&self, name: &str) -> String {
        format!("ssh://{}@127.0.0.1:{}{}", self.user(), self.port, self.repo_dir(name).display())
    }

    pub fn repo_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("repos").join(name)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The key sshd accepts.
    pub fn client_key(&self) -> &KeyPair {
        &self.client_key
    }

    /// sshd's own host key.
    pub fn host_key(&self) -> &KeyPair {
        &self.host_key
    }

    /// The second host key ([`Sshd::start_with_rsa_host_key`]).
    pub fn second_host_key(&self) -> Option<&KeyPair> {
        self.second_host_key.as_ref()
    }

    /// The known_hosts line that pins sshd's host key.
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}", self.port, self.host_key.public_key())
    }

    /// A fresh key pair sshd does not know, in its directory.
    pub fn stranger_key(&self, name: &str) -> KeyPair {
        KeyPair::generate(self.dir.path(), name, "ed25519")
    }

    /// A fresh key pair of type `kind` (`rsa`, `ecdsa`, `ed25519`) that sshd accepts too.
    pub fn authorized_key(&self, name: &str, kind: &str) -> KeyPair {
        let key = KeyPair::generate(self.dir.path(), name, kind);
        let mut keys = std::fs::read_to_string(self.dir.path().join("authorized_keys")).unwrap();
        keys.push_str(&format!("{}\n", key.public));
        std::fs::write(self.dir.path().join("authorized_keys"), keys).unwrap();
        key
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The ids of the processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // `pid (comm) state ppid ...`: comm may hold spaces, so read after its last `)`.
            std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|stat| {
                let rest = &stat[stat.rfind(')')? + 1..];
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(pid)
        })
        .collect()
}
