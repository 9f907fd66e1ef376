//! Repository URLs: parsed once, at the edge, into a canonical form that carries no
//! credentials, and allowlist patterns matched against that form segment by segment.
//! Whatever reaches gix is built from the canonical form, never from the caller's string.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The longest URL we look at.
const MAX_URL_LEN: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Git,
    Http,
    Https,
    /// `ssh://[user@]host[:port]/path`, or scp-like `user@host:path`: git over an SSH
    /// session of gitstate's own (no `ssh` binary).
    Ssh,
}

impl Scheme {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "git" => Some(Scheme::Git),
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            "ssh" => Some(Scheme::Ssh),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Git => "git",
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Ssh => "ssh",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Git => 9418,
            Scheme::Http => 80,
            Scheme::Https => 443,
            Scheme::Ssh => 22,
        }
    }
}

/// Why a repository URL (or pattern) was refused. Shown to the caller: never echoes the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error(
        "the repository URL must start with git://, http://, https:// or ssh:// (or be scp-like user@host:path); file:// needs git's own programs"
    )]
    Scheme,
    #[error("the repository URL must not carry credentials (a password; a user only in ssh:// URLs)")]
    Credentials,
    #[error("the repository URL is not in canonical form: {0}")]
    NotCanonical(&'static str),
}

/// A repository URL in canonical form: lowercase scheme and host, no password, a user
/// only for `ssh://` (where it is part of the address: `git` when none is written), the
/// default port dropped, a path of non-empty segments without dots-only segments,
/// percent-escapes, backslashes, query or fragment. Its `Display` is that form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoUrl {
    scheme: Scheme,
    /// The SSH user (`ssh://` only; never a credential).
    user: Option<String>,
    host: String,
    /// `None` for the scheme's default port.
    port: Option<u16>,
    segments: Vec<String>,
}

/// The parts of `scheme://authority/path` before any check of their content.
struct RawParts<'a> {
    scheme: &'a str,
    user: Option<&'a str>,
    authority: &'a str,
    path: &'a str,
}

fn split_parts(s: &str) -> Result<RawParts<'_>, UrlError> {
    if s.len() > MAX_URL_LEN {
        return Err(UrlError::NotCanonical("longer than 2048 bytes"));
    }
    let (scheme, rest) = s.split_once("://").ok_or(UrlError::Scheme)?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // Checked before anything else so that credentials are named as such, whatever else is wrong.
    let (user, authority) = match authority.rsplit_once('@') {
        // The SSH user is part of the address; anywhere else a user is a credential.
        Some((user, host)) if scheme == "ssh" => (Some(check_user(user)?), host),
        Some(_) => return Err(UrlError::Credentials),
        None => (None, authority),
    };
    Ok(RawParts { scheme, user, authority, path })
}

/// An SSH user: a plain name (no password, nothing a shell or ssh could read as an option).
fn check_user(user: &str) -> Result<&str, UrlError> {
    if user.contains(':') || user.contains('@') {
        return Err(UrlError::Credentials);
    }
    let ok = (1..=32).contains(&user.len())
        && user.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !user.starts_with(['-', '.']);
    if ok {
        Ok(user)
    } else {
        Err(UrlError::NotCanonical("invalid SSH user (letters, digits, `-` `_` `.`; not starting with `-`)"))
    }
}

/// The `ssh://` spelling of a scp-like `user@host:path` (`None`: not scp-like). As git does,
/// a path not starting with `/` is read from the root (`git@github.com:o/r.git` is
/// `ssh://git@github.com/o/r.git`) except `~/…`, which stays relative to the user's home.
fn scp_to_ssh(s: &str) -> Option<Result<String, UrlError>> {
    if s.contains("://") || s.starts_with('/') || !s.contains(':') {
        return None;
    }
    // Paths hold no `@`: the user is everything before the last one.
    let Some((user, rest)) = s.rsplit_once('@') else {
        return Some(Err(UrlError::NotCanonical("a scp-like repository URL needs a user: user@host:path")));
    };
    let user = match check_user(user) {
        Ok(user) => user,
        Err(e) => return Some(Err(e)),
    };
    let Some((host, path)) = rest.split_once(':') else {
        return Some(Err(UrlError::NotCanonical("a scp-like repository URL is user@host:path")));
    };
    if host.starts_with('[') || path.contains(':') {
        return Some(Err(UrlError::NotCanonical("write an IPv6 host or a port as ssh://user@[host]:port/path")));
    }
    let path = path.strip_prefix('/').unwrap_or(path);
    Some(Ok(format!("ssh://{user}@{host}/{path}")))
}

fn parse_scheme(s: &str) -> Result<Scheme, UrlError> {
    if let Some(scheme) = Scheme::parse(s) {
        return Ok(scheme);
    }
    if Scheme::parse(&s.to_ascii_lowercase()).is_some() {
        return Err(UrlError::NotCanonical("the scheme must be lowercase"));
    }
    Err(UrlError::Scheme)
}

/// `host[:port]`, where the port is dropped when it is the scheme's default.
fn parse_authority(
    authority: &str,
    scheme: Scheme,
    label_ok: fn(&str) -> bool,
) -> Result<(String, Option<u16>), UrlError> {
    if authority.is_empty() {
        return Err(UrlError::NotCanonical("no host"));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(UrlError::NotCanonical("unterminated IPv6 address"))?;
        let addr: Ipv6Addr = v6.parse().map_err(|_| UrlError::NotCanonical("invalid IPv6 address"))?;
        if addr.to_string() != v6 {
            return Err(UrlError::NotCanonical("the IPv6 address is not in its shortest lowercase form"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(UrlError::NotCanonical("garbage after the IPv6 address"))?),
        };
        (format!("[{v6}]"), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        check_host(host, label_ok)?;
        (host.to_owned(), port)
    };
    let port = match port {
        None => None,
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) || p.starts_with('0') {
                return Err(UrlError::NotCanonical("invalid port"));
            }
            let n: u16 = p.parse().map_err(|_| UrlError::NotCanonical("invalid port"))?;
            (n != scheme.default_port()).then_some(n)
        }
    };
    Ok((host, port))
}

/// A DNS name of lowercase ASCII labels, or a dotted-quad IPv4 address written the one canonical way.
fn check_host(host: &str, label_ok: fn(&str) -> bool) -> Result<(), UrlError> {
    if host.is_empty() || host.len() > 253 {
        return Err(UrlError::NotCanonical("invalid host"));
    }
    if !host.is_ascii() {
        return Err(UrlError::NotCanonical("the host must be ASCII (use the xn-- form of an international name)"));
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(UrlError::NotCanonical("the host must be lowercase"));
    }
    let labels: Vec<&str> = host.split('.').collect();
    let last = labels.last().copied().unwrap_or_default();
    // URL parsers read a host whose last label is a number as an IPv4 address (also in hex or octal).
    let numeric = |l: &str| !l.is_empty() && (l.bytes().all(|b| b.is_ascii_digit()) || l.starts_with("0x"));
    if numeric(last) {
        let addr: Ipv4Addr = host.parse().map_err(|_| UrlError::NotCanonical("invalid IPv4 address"))?;
        if addr.to_string() != host {
            return Err(UrlError::NotCanonical("the IPv4 address is not in dotted-decimal form"));
        }
        return Ok(());
    }
    if labels.iter().all(|l| label_ok(l)) {
        Ok(())
    } else {
        Err(UrlError::NotCanonical("invalid host name"))
    }
}

fn is_dns_label(l: &str) -> bool {
    (1..=63).contains(&l.len())
        && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// Path segments: `/a/b.git` → `["a", "b.git"]`, each non-empty, not `.`/`..`, of safe characters only.
fn parse_path(path: &str, segment_ok: fn(&str) -> bool) -> Result<Vec<String>, UrlError> {
    let Some(rest) = path.strip_prefix('/') else { return Err(UrlError::NotCanonical("no repository path")) };
    if path.contains(['?', '#']) {
        return Err(UrlError::NotCanonical("a query or fragment is not allowed"));
    }
    if path.contains('%') {
        return Err(UrlError::NotCanonical("percent-escapes are not allowed in the path"));
    }
    if path.contains('\\') {
        return Err(UrlError::NotCanonical("backslashes are not allowed"));
    }
    let mut segments = Vec::new();
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(UrlError::NotCanonical("empty path segment (`//` or a trailing `/`)"));
        }
        if segment.bytes().all(|b| b == b'.') {
            return Err(UrlError::NotCanonical("`.` and `..` segments are not allowed"));
        }
        if !segment_ok(segment) {
            return Err(UrlError::NotCanonical(
                "path segments may hold only ASCII letters, digits and `-` `_` `.` `~` `+`",
            ));
        }
        segments.push(segment.to_owned());
    }
    Ok(segments)
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.~+".contains(&b)
}

fn is_segment(s: &str) -> bool {
    s.bytes().all(is_path_char)
}

impl RepoUrl {
    /// Parse a URL a caller (or the configuration) sent; anything not canonical is refused.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let scp = scp_to_ssh(s).transpose()?;
        let raw = split_parts(scp.as_deref().unwrap_or(s))?;
        let scheme = parse_scheme(raw.scheme)?;
        let (host, port) = parse_authority(raw.authority, scheme, is_dns_label)?;
        let segments = parse_path(raw.path, is_segment)?;
        let user = ssh_user(scheme, raw.user);
        Ok(RepoUrl { scheme, user, host, port, segments })
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The SSH user (`ssh://` URLs only).
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The repository path as the host's `git-upload-pack`/`git-receive-pack` is given it:
    /// `/a/b.git`, or `~/a/b.git` for a path under the user's home (`ssh://h/~/a/b.git`).
    pub fn remote_path(&self) -> String {
        let path = format!("/{}", self.segments.join("/"));
        match path.strip_prefix("/~") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("~{rest}"),
            _ => path,
        }
    }

    /// The host as written in the URL (an IPv6 address keeps its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(self.scheme.default_port())
    }

    /// The same repository under another spelling: `x` and `x.git` compare equal.
    pub fn same_repository(&self, other: &RepoUrl) -> bool {
        self.scheme == other.scheme
            && self.user == other.user
            && self.host == other.host
            && self.port == other.port
            && self.segments.len() == other.segments.len()
            && self.segments.iter().zip(&other.segments).all(|(a, b)| strip_git(a) == strip_git(b))
    }

    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The URL gix is given: built from the canonical parts.
    pub fn to_gix(&self) -> gix::Url {
        let scheme = match self.scheme {
            Scheme::Git => gix::url::Scheme::Git,
            Scheme::Http => gix::url::Scheme::Http,
            Scheme::Https => gix::url::Scheme::Https,
            Scheme::Ssh => gix::url::Scheme::Ssh,
        };
        let path = format!("/{}", self.segments.join("/"));
        gix::Url::from_parts(scheme, self.user.clone(), None, Some(self.host.clone()), self.port, path.into(), false)
            .expect("a canonical repository URL is a valid gix URL")
    }
}

/// `ssh://` always has a user (`git` when none is written); other schemes never.
fn ssh_user(scheme: Scheme, user: Option<&str>) -> Option<String> {
    (scheme == Scheme::Ssh).then(|| user.unwrap_or("git").to_owned())
}

fn strip_git(segment: &str) -> &str {
    segment.strip_suffix(".git").filter(|s| !s.is_empty()).unwrap_or(segment)
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.as_str())?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for s in &self.segments {
            write!(f, "/{s}")?;
        }
        Ok(())
    }
}

/// A caller-sent URL that could not be parsed, fit for a log line: user info and query
/// dropped, control characters escaped, cut short. The one redaction of raw URLs.
pub fn redact_raw(s: &str) -> String {
    let s = s.split(['?', '#']).next().unwrap_or_default();
    let s = match s.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        // scp-like `user@host:path`: whatever precedes the host may hold a password.
        None => s.rsplit_once('@').map_or(s, |(_, rest)| rest).to_owned(),
    };
    s.chars().take(200).flat_map(char::escape_debug).collect()
}

/// An allowlist entry: a URL whose host labels and path segments may hold one `*` each,
/// which matches within that label or segment and never across a separator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPattern {
    scheme: Scheme,
    /// The SSH user (`ssh://` only), matched exactly.
    user: Option<String>,
    host_labels: Vec<String>,
    /// `None`: an IPv6 host, matched exactly.
    host_exact: Option<String>,
    port: Option<u16>,
    segments: Vec<String>,
}

fn is_glob_label(l: &str) -> bool {
    l.matches('*').count() <= 1 && (l == "*" || is_dns_label(&l.replace('*', "a")))
}

fn is_glob_segment(s: &str) -> bool {
    s.matches('*').count() <= 1 && s.bytes().all(|b| b == b'*' || is_path_char(b))
}

/// One label or segment against a pattern with at most one `*`: a prefix and suffix check, linear.
fn glob_one(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((prefix, suffix)) => {
            text.len() >= prefix.len() + suffix.len() && text.starts_with(prefix) && text.ends_with(suffix)
        }
    }
}

impl UrlPattern {
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let scp = scp_to_ssh(s).transpose()?;
        let raw = split_parts(scp.as_deref().unwrap_or(s))?;
        let scheme = parse_scheme(raw.scheme)?;
        let user = ssh_user(scheme, raw.user);
        let (host, port) = if raw.authority.starts_with('[') {
            parse_authority(raw.authority, scheme, is_dns_label)?
        } else {
            // Globbed labels are checked here; a host without `*` goes through the URL rules.
            let (h, p) = match raw.authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (raw.authority, None),
            };
            if h.contains('*') {
                if !h.split('.').all(is_glob_label) {
                    return Err(UrlError::NotCanonical("invalid host pattern"));
                }
                let with_port = match p {
                    Some(p) => format!("placeholder:{p}"),
                    None => "placeholder".into(),
                };
                let (_, port) = parse_authority(&with_port, scheme, is_dns_label)?;
                (h.to_owned(), port)
            } else {
                parse_authority(raw.authority, scheme, is_dns_label)?
            }
        };
        let segments = parse_path(raw.path, is_glob_segment)?;
        let host_exact = host.starts_with('[').then(|| host.clone());
        let host_labels = host.split('.').map(str::to_owned).collect();
        Ok(UrlPattern { scheme, user, host_labels, host_exact, port, segments })
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The host and port every URL this pattern matches has; `None` when the host has a `*`.
    pub fn exact_host(&self) -> Option<(String, u16)> {
        let host = self.host_exact.clone().unwrap_or_else(|| self.host_labels.join("."));
        (!host.contains('*')).then(|| (host, self.port.unwrap_or(self.scheme.default_port())))
    }

    /// Scheme, host, port and path compared part by part; `x` and `x.git` in the last segment are one repository.
    pub fn matches(&self, url: &RepoUrl) -> bool {
        if self.scheme != url.scheme
            || self.user != url.user
            || self.port != url.port
            || self.segments.len() != url.segments.len()
        {
            return false;
        }
        let host_ok = match &self.host_exact {
            Some(exact) => *exact == url.host,
            None => {
                let labels: Vec<&str> = url.host.split('.').collect();
                labels.len() == self.host_labels.len()
                    && self.host_labels.iter().zip(&labels).all(|(p, l)| glob_one(p, l))
            }
        };
        let last = self.segments.len().saturating_sub(1);
        host_ok
            && self
                .segments
                .iter()
                .zip(&url.segments)
                .enumerate()
                .all(|(i, (p, s))| glob_one(p, s) || (i == last && glob_one(strip_git(p), strip_git(s))))
    }
}

impl fmt::Display for UrlPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.as_str())?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        write!(f, "{}", self.host_labels.join("."))?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for s in &self.segments {
            write!(f, "/{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_urls_parse_and_print_back() {
        for s in [
            "https://git.example.com/team/states.git",
            "git://127.0.0.1:9418/x.git",
            "http://[::1]:8080/git/a",
            "https://xn--bcher-kva.example/a_b/c-d/e~f/g+h",
        ] {
            let u = RepoUrl::parse(s).unwrap();
            let printed = u.to_string();
            assert_eq!(RepoUrl::parse(&printed).unwrap(), u, "{s}");
        }
        // The default port is dropped; another is kept.
        assert_eq!(RepoUrl::parse("https://h:443/x").unwrap().to_string(), "https://h/x");
        assert_eq!(RepoUrl::parse("git://h:9418/x").unwrap().to_string(), "git://h/x");
        assert_eq!(RepoUrl::parse("git://h:1234/x").unwrap().port(), 1234);
        assert_eq!(RepoUrl::parse("http://h/x").unwrap().to_gix().to_bstring(), "http://h/x");
    }

    #[test]
    fn anything_not_canonical_is_refused() {
        let cases: &[(&str, UrlError)] = &[
            ("https://user:pw@h/x", UrlError::Credentials),
            ("https://user@h/x", UrlError::Credentials),
            ("file:///etc/passwd", UrlError::Scheme),
            ("ssh://git:pw@h/x", UrlError::Credentials),
            ("git:pw@h:x", UrlError::Credentials),
            ("/local/path", UrlError::Scheme),
        ];
        for (s, want) in cases {
            assert_eq!(&RepoUrl::parse(s).unwrap_err(), want, "{s}");
        }
        for s in [
            "HTTPS://h/x",
            "https://h/x@y/../z",
            "https://H/x",
            "https://h/a/../b",
            "https://h/a/./b",
            "https://h/a//b",
            "https://h/a/",
            "https://h",
            "https://h/",
            "https://h/a%2fb",
            "https://h/a%2Fb",
            "https://h/a%2e%2e/b",
            "https://h/a%5cb",
            "https://h/a\\..\\b",
            "https://h/a?x=1",
            "https://h/a#frag",
            "https://h?.evil.com/a",
            "https://h#.evil.com/a",
            "https://bücher.example/a",
            "https://h/bü",
            "https://127.1/a",
            "https://0x7f.0.0.1/a",
            "https://2130706433/a",
            "https://127.000.000.001/a",
            "https://[0:0:0:0:0:0:0:1]/a",
            "https://h:0/a",
            "https://h:08080/a",
            "https://h:99999/a",
            "https://h:/a",
            "https://-h/a",
            "https://h./a",
            "https://h/a b",
            "https://h/a;b",
            "https://h/a\nb",
        ] {
            assert!(matches!(RepoUrl::parse(s), Err(UrlError::NotCanonical(_))), "{s:?} should be refused");
        }
        assert!(RepoUrl::parse(&format!("https://h/{}", "a".repeat(3000))).is_err());
    }

    #[test]
    fn patterns_match_segment_by_segment() {
        let p = |s: &str| UrlPattern::parse(s).unwrap();
        let u = |s: &str| RepoUrl::parse(s).unwrap();
        let team = p("http://host/git/team/*");
        assert!(team.matches(&u("http://host/git/team/a.git")));
        assert!(team.matches(&u("http://host:80/git/team/a")));
        assert!(!team.matches(&u("http://host/git/team/a/b")));
        assert!(!team.matches(&u("http://host/git/other/secret.git")));
        assert!(!team.matches(&u("http://host:8080/git/team/a")), "another port");
        assert!(!team.matches(&u("https://host/git/team/a")), "another scheme");
        assert!(!team.matches(&u("http://host.evil/git/team/a")));
        let glob = p("http://127.0.0.1:9000/git/team-*.git");
        assert!(glob.matches(&u("http://127.0.0.1:9000/git/team-a.git")));
        assert!(glob.matches(&u("http://127.0.0.1:9000/git/team-a")));
        assert!(!glob.matches(&u("http://127.0.0.1:9000/git/xteam-a.git")));
        assert!(!glob.matches(&u("http://127.0.0.1:9001/git/team-a.git")));
        let hosts = p("https://*.example.com/org/*");
        assert!(hosts.matches(&u("https://git.example.com/org/x")));
        assert!(!hosts.matches(&u("https://a.b.example.com/org/x")), "`*` is one label");
        assert!(!hosts.matches(&u("https://example.com/org/x")));
        assert!(!hosts.matches(&u("https://evil.com/org/x")));
        // Exact entries compare `x` and `x.git` as one repository.
        assert!(p("https://h/team/states.git").matches(&u("https://h/team/states")));
        // Two stars in one segment are refused: matching stays linear.
        assert!(UrlPattern::parse("https://h/a*b*c").is_err());
        assert!(UrlPattern::parse("https://h/a/**").is_err());
        // Long inputs cost linear time.
        let long = u(&format!("https://h/{}", "a".repeat(2000)));
        assert!(!p("https://h/*b").matches(&long));
    }

    #[test]
    fn ssh_urls_parse_into_one_canonical_form() {
        let u = |s: &str| RepoUrl::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        let github = u("git@github.com:team/states.git");
        assert_eq!(github.to_string(), "ssh://git@github.com/team/states.git");
        assert_eq!(github, u("ssh://git@github.com/team/states.git"));
        assert_eq!(github, u("ssh://git@github.com:22/team/states.git"), "22 is ssh's default port");
        assert_eq!(github, u("ssh://github.com/team/states.git"), "the user is `git` when none is written");
        assert_eq!(github, u("git@github.com:/team/states.git"));
        assert_eq!(
            (github.user(), github.port(), github.remote_path().as_str()),
            (Some("git"), 22, "/team/states.git")
        );
        let other = u("ssh://root@127.0.0.1:2222/srv/git/x.git");
        assert_eq!(other.to_string(), "ssh://root@127.0.0.1:2222/srv/git/x.git");
        assert_eq!((other.host(), other.port()), ("127.0.0.1", 2222));
        assert!(!other.same_repository(&u("ssh://git@127.0.0.1:2222/srv/git/x.git")), "another user");
        assert!(other.same_repository(&u("ssh://root@127.0.0.1:2222/srv/git/x")));
        // Home-relative paths, as git sends them.
        assert_eq!(u("deploy@h:~/repos/x.git").remote_path(), "~/repos/x.git");
        assert_eq!(u("ssh://deploy@h/~/repos/x.git").to_string(), "ssh://deploy@h/~/repos/x.git");
        assert_eq!(u("ssh://deploy@h/~x/a").remote_path(), "/~x/a");
        assert_eq!(u("ssh://git@[::1]:2222/x.git").to_string(), "ssh://git@[::1]:2222/x.git");
        assert_eq!(u("ssh://git@h/x").to_gix().to_bstring(), "ssh://git@h/x");
        // Users with dots, digits and dashes inside.
        assert_eq!(u("ssh://deploy-bot.1@h/x").user(), Some("deploy-bot.1"));
    }

    #[test]
    fn ssh_urls_are_attacked_from_every_side() {
        let refused = |s: &str| RepoUrl::parse(s).expect_err(s);
        // Passwords, in either spelling.
        for s in ["ssh://git:pw@h/x", "git:pw@h:x", "ssh://git:@h/x", "ssh://a@b@h/x", "a:b@c@h:x"] {
            assert_eq!(refused(s), UrlError::Credentials, "{s}");
        }
        for s in [
            // Empty or hostile users, hosts and paths (an option to ssh, a shell's quote).
            "ssh://@h/x",
            "@h:x",
            "ssh://-oProxyCommand=touch@h/x",
            "-oProxyCommand=x@h:y",
            "ssh://git@-oProxyCommand=touch/x",
            "git@-oProxyCommand=touch:x",
            "git@h:-upload'pack/x",
            "ssh://git@h/a'b",
            "ssh://git@h/a\"b",
            "ssh://git@h/a;touch%20x",
            "ssh://git@h/a`id`",
            "ssh://git@h/$(id)",
            "ssh://git@h/a b",
            "ssh://git@h/a/../b",
            "git@h:../x",
            "git@h:a/../../etc",
            "git@h:",
            "git@h:/",
            "ssh://git@h",
            "ssh://git@h/",
            "ssh://g\nit@h/x",
            "ssh://Git User@h/x",
            "ssh://git@H/x",
            "SSH://git@h/x",
            // Ports and IPv6.
            "ssh://git@h:0/x",
            "ssh://git@h:65536/x",
            "ssh://git@h:022/x",
            "ssh://git@h:/x",
            "git@h:2222:x",
            "git@[::1]:x",
            "ssh://git@[0:0:0:0:0:0:0:1]/x",
            "ssh://git@[::1/x",
            "ssh://git@127.1/x",
            // scp-like without a user, and queries.
            "h:x",
            "github.com:team/x.git",
            "ssh://git@h/x?ProxyCommand=y",
            "ssh://git@h/x#y",
        ] {
            assert!(RepoUrl::parse(s).is_err(), "{s:?} should be refused");
        }
        // A path segment starting with `-` stays under `/`: never an option of git-upload-pack.
        assert_eq!(RepoUrl::parse("git@h:-x").unwrap().remote_path(), "/-x");
    }

    #[test]
    fn ssh_patterns_match_the_canonical_form() {
        let p = |s: &str| UrlPattern::parse(s).unwrap();
        let u = |s: &str| RepoUrl::parse(s).unwrap();
        let org = p("ssh://git@github.com/team/*");
        assert!(org.matches(&u("git@github.com:team/states.git")));
        assert!(org.matches(&u("ssh://github.com:22/team/states")));
        assert!(!org.matches(&u("ssh://root@github.com/team/states.git")), "another user");
        assert!(!org.matches(&u("ssh://git@github.com:2222/team/states.git")), "another port");
        assert!(!org.matches(&u("https://github.com/team/states.git")), "another scheme");
        assert!(!org.matches(&u("git@github.com:other/states.git")));
        assert!(p("git@github.com:team/*").matches(&u("ssh://git@github.com/team/x")));
        assert_eq!(p("git@github.com:team/*").to_string(), "ssh://git@github.com/team/*");
        assert!(UrlPattern::parse("ssh://git:pw@h/*").is_err());
        assert!(UrlPattern::parse("ssh://g*@h/*").is_err(), "users are exact");
    }

    #[test]
    fn raw_urls_are_redacted_for_logs() {
        assert_eq!(redact_raw("git:secret@h:x"), "h:x");
        assert_eq!(redact_raw("https://u:secret@h/x?token=abc"), "https://h/x");
        assert_eq!(redact_raw("https://h/x\nFORGED"), "https://h/x\\nFORGED");
        assert!(!redact_raw("\u{1b}[31mred").contains('\u{1b}'));
    }
}
