//! Certificates for HTTPS git hosts in tests, made with the `openssl` CLI (Debian `openssl`,
//! installed by `scripts/test.sh`): a test CA, and server certificates it signs for a name,
//! valid now or only in the past. lighttpd serves them with `mod_openssl`
//! ([`super::httpd::GitHttpServer::start_tls`]); gitstate trusts the CA through `SSL_CERT_FILE`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap_or_else(|e| {
        panic!("openssl not found ({e}): HTTPS test hosts need it; install the test tools with `bash scripts/test.sh`")
    });
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA in `dir` (`<name>.pem`, `<name>.key`); returns the certificate's path.
pub fn test_ca(dir: &Path, name: &str) -> PathBuf {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    let subject = format!("/CN=gitstate test {name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem, "-days", "2", "-subj",
            &subject,
        ],
    );
    dir.join(pem)
}

/// A server certificate and its key in one PEM file (as lighttpd takes them), signed by the
/// CA `ca` of [`test_ca`], for `san` (e.g. `IP:127.0.0.1`), valid now, or only in January 2020.
pub fn server_cert(dir: &Path, ca: &str, name: &str, san: &str, expired: bool) -> PathBuf {
    let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
    openssl(
        dir,
        &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", "/CN=gitstate test host"],
    );
    std::fs::write(dir.join(format!("{name}.ext")), format!("subjectAltName={san}\n")).unwrap();
    let (ca_pem, ca_key, ext) = (format!("{ca}.pem"), format!("{ca}.key"), format!("{name}.ext"));
    if expired {
        // `openssl ca` can date a certificate in the past; it wants a small database.
        let db = dir.join(format!("{name}-db"));
        std::fs::create_dir_all(&db).unwrap();
        std::fs::write(db.join("index.txt"), "").unwrap();
        std::fs::write(db.join("serial"), "1000\n").unwrap();
        let conf = format!(
            "[ca]\ndefault_ca = test\n[test]\ndatabase = {db}/index.txt\nserial = {db}/serial\nnew_certs_dir = {db}\n\
             default_md = sha256\npolicy = any\ncopy_extensions = none\n[any]\ncommonName = supplied\n",
            db = db.display()
        );
        let cnf = format!("{name}.cnf");
        std::fs::write(dir.join(&cnf), conf).unwrap();
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                &cnf,
                "-cert",
                &ca_pem,
                "-keyfile",
                &ca_key,
                "-in",
                &csr,
                "-out",
                &crt,
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
                "-extfile",
                &ext,
            ],
        );
    } else {
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    let pem = dir.join(format!("{name}.pem"));
    let mut both = std::fs::read(dir.join(&crt)).unwrap();
    both.extend(std::fs::read(dir.join(&key)).unwrap());
    std::fs::write(&pem, both).unwrap();
    pem
}
