//! Encryption at rest: states are sealed before they reach git and opened after they leave
//! it, as standard armored age files or as KMS envelopes (AES-256-GCM under a KMS data key).
//! The backend's rules (guard, identical writes, Content-MD5) only ever see opened states.

use std::io::{Read, Write};
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use lru::LruCache;
use zeroize::Zeroizing;

use crate::context::RequestContext;

/// The first line of an armored age file.
const AGE_ARMOR: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";
/// The first line of a binary age file.
const AGE_BINARY: &[u8] = b"age-encryption.org/v1";
/// Plaintext data keys kept in a warm process, and for how long.
const DATA_KEYS: usize = 64;
const DATA_KEY_TTL: Duration = Duration::from_secs(300);

/// Why a state could not be sealed or opened. Never carries state content or key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SealError {
    /// The stored state is encrypted to keys this deployment does not hold.
    #[error("the stored state cannot be decrypted: it needs {needs}")]
    CannotOpen { needs: String },
    /// The stored bytes claim an encrypted format and are damaged.
    #[error("the stored state is damaged: {0}")]
    Damaged(String),
    /// The key service could not be reached in time: try again.
    #[error("the key service is unavailable: {0}")]
    KeyServiceUnavailable(String),
    /// The key service refused (access denied, key disabled or unknown).
    #[error("the key service refused: {0}")]
    KeyServiceRefused(String),
}

/// The keys of this deployment. `Debug` shows no identity.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SealingSettings {
    /// `GITSTATE_AGE_RECIPIENTS`: age public keys every write is encrypted to.
    pub age_recipients: Vec<String>,
    /// `GITSTATE_AGE_IDENTITIES` / `GITSTATE_AGE_IDENTITY_FILE` / the secret's `age_identities`:
    /// the text of age identities that may open stored states.
    pub age_identities: Option<Zeroizing<String>>,
    /// `GITSTATE_KMS_KEY_ID`: the KMS key every write is sealed under.
    pub kms_key_id: Option<String>,
    /// `GITSTATE_KMS_DECRYPT_KEY_IDS`: further KMS keys whose envelopes may be opened (rotation).
    pub kms_decrypt_key_ids: Vec<String>,
}

impl std::fmt::Debug for SealingSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingSettings")
            .field("age_recipients", &self.age_recipients)
            .field("age_identities", &self.age_identities.as_ref().map(|_| "<redacted>"))
            .field("kms_key_id", &self.kms_key_id)
            .field("kms_decrypt_key_ids", &self.kms_decrypt_key_ids)
            .finish()
    }
}

/// A setting that makes no sense; refused at start.
#[derive(Debug, thiserror::Error)]
#[error("encryption settings: {0}")]
pub struct SealingConfigError(pub String);

/// How this deployment seals and opens states.
pub struct Sealing {
    recipients: Vec<age::x25519::Recipient>,
    identities: Vec<age::x25519::Identity>,
    kms: Option<Kms>,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealing")
            .field("age_recipients", &self.recipients.len())
            .field("age_identities", &self.identities.len())
            .field("kms", &self.kms.as_ref().map(|k| k.key_id.as_str()))
            .finish()
    }
}

struct Kms {
    client: aws_sdk_kms::Client,
    runtime: tokio::runtime::Handle,
    key_id: String,
    /// Key ids whose envelopes may be opened: the sealing key and the rotation list.
    readable: Vec<String>,
    /// Plaintext data keys by wrapped key, each with the time it was unwrapped.
    data_keys: Mutex<LruCache<Vec<u8>, DataKey>>,
    /// The ARN of each configured key id (an alias or a bare id), learned once.
    arns: Mutex<std::collections::HashMap<String, String>>,
}

/// A plaintext data key and when it was unwrapped.
type DataKey = (Instant, Zeroizing<[u8; 32]>);

/// The stored form of a KMS-sealed state.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    gitstate_envelope: u32,
    algorithm: String,
    key_id: String,
    wrapped_key: String,
    nonce: String,
    ciphertext: String,
}

const ENVELOPE_VERSION: u32 = 1;
const ALGORITHM: &str = "AES-256-GCM";

impl Sealing {
    /// No encryption: states are stored as they come.
    pub fn clear() -> Self {
        Sealing { recipients: Vec::new(), identities: Vec::new(), kms: None }
    }

    /// The sealing of `settings`. KMS needs the AWS SDK configuration and a runtime handle to
    /// drive its calls from the blocking pool.
    pub fn new(
        settings: &SealingSettings,
        aws: Option<(&aws_config::SdkConfig, tokio::runtime::Handle)>,
    ) -> Result<Self, SealingConfigError> {
        let bad = |s: String| SealingConfigError(s);
        let recipients = settings
            .age_recipients
            .iter()
            .map(|r| {
                age::x25519::Recipient::from_str(r.trim())
                    .map_err(|_| bad(format!("`{r}` is not an age X25519 recipient (age1...)")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let identities = match &settings.age_identities {
            Some(text) => parse_identities(text)?,
            None => Vec::new(),
        };
        if !recipients.is_empty() && identities.is_empty() {
            return Err(bad("GITSTATE_AGE_RECIPIENTS needs identities too (GITSTATE_AGE_IDENTITIES or GITSTATE_AGE_IDENTITY_FILE): gitstate reads the stored state to guard every write".into()));
        }
        if recipients.is_empty() && !identities.is_empty() && settings.kms_key_id.is_none() {
            return Err(bad(
                "age identities are set but no GITSTATE_AGE_RECIPIENTS: writes would be stored in clear".into()
            ));
        }
        if !recipients.is_empty() && settings.kms_key_id.is_some() {
            return Err(bad("set either GITSTATE_AGE_RECIPIENTS or GITSTATE_KMS_KEY_ID, not both".into()));
        }
        let kms = match &settings.kms_key_id {
            None => None,
            Some(key_id) => {
                let (sdk, runtime) =
                    aws.ok_or_else(|| bad("GITSTATE_KMS_KEY_ID needs the AWS configuration".into()))?;
                let mut readable = vec![key_id.clone()];
                readable.extend(settings.kms_decrypt_key_ids.iter().cloned());
                Some(Kms {
                    client: aws_sdk_kms::Client::new(sdk),
                    runtime,
                    key_id: key_id.clone(),
                    readable,
                    data_keys: Mutex::new(LruCache::new(NonZeroUsize::new(DATA_KEYS).expect("not zero"))),
                    arns: Mutex::new(std::collections::HashMap::new()),
                })
            }
        };
        Ok(Sealing { recipients, identities, kms })
    }

    /// Whether writes are encrypted.
    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty() || self.kms.is_some()
    }

    /// Whether `stored` is in a form this deployment would not write now: clear while writes
    /// are encrypted, an age file none of the current recipients' identities opens (sealed to a
    /// rotated-out recipient), or a KMS envelope under another key.
    pub fn needs_reseal(&self, ctx: &RequestContext, stored: &[u8]) -> Result<bool, SealError> {
        let head = trim_start(stored);
        let age = head.starts_with(AGE_ARMOR) || head.starts_with(AGE_BINARY);
        if let Some(kms) = &self.kms {
            return match parse_envelope(head).and_then(Result::ok) {
                Some(envelope) => Ok(envelope.key_id != kms.arn_of(ctx, &kms.key_id)?),
                None => Ok(true),
            };
        }
        if self.recipients.is_empty() {
            return Ok(false);
        }
        if !age {
            return Ok(true);
        }
        // An age file does not name its recipients; whether the identities of the current
        // recipients open it says whether it was sealed to them.
        let current: Vec<&age::x25519::Identity> =
            self.identities.iter().filter(|i| self.recipients.contains(&i.to_public())).collect();
        let Ok(decryptor) = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(stored)) else {
            return Ok(true);
        };
        Ok(decryptor.decrypt(current.into_iter().map(|i| i as &dyn age::Identity)).is_err())
    }

    /// The stored form of `plain`.
    pub fn seal(&self, ctx: &RequestContext, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        if let Some(kms) = &self.kms {
            return kms.seal(ctx, plain);
        }
        if self.recipients.is_empty() {
            return Ok(plain.to_vec());
        }
        seal_age(&self.recipients, plain)
    }

    /// The state in `stored`: opened when encrypted, as it is when stored in clear (before
    /// encryption was turned on).
    pub fn open(&self, ctx: &RequestContext, stored: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let head = trim_start(stored);
        if head.starts_with(AGE_ARMOR) || head.starts_with(AGE_BINARY) {
            return self.open_age(stored);
        }
        if let Some(envelope) = parse_envelope(head) {
            return match &self.kms {
                Some(kms) => kms.open(ctx, &envelope?),
                None => Err(SealError::CannotOpen {
                    needs: format!("AWS KMS key {} (set GITSTATE_KMS_KEY_ID)", envelope?.key_id),
                }),
            };
        }
        Ok(Zeroizing::new(stored.to_vec()))
    }

    fn open_age(&self, stored: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let needs = || SealError::CannotOpen {
            needs: if self.identities.is_empty() {
                "an age identity (set GITSTATE_AGE_IDENTITIES or GITSTATE_AGE_IDENTITY_FILE)".into()
            } else {
                let mine: Vec<String> = self.identities.iter().map(|i| i.to_public().to_string()).collect();
                format!("an age identity for one of its recipients; none of the configured identities (public keys {}) opens it", mine.join(", "))
            },
        };
        if self.identities.is_empty() {
            return Err(needs());
        }
        let decryptor = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(stored))
            .map_err(|e| SealError::Damaged(format!("not a readable age file: {e}")))?;
        let mut reader = match decryptor.decrypt(self.identities.iter().map(|i| i as &dyn age::Identity)) {
            Ok(reader) => reader,
            Err(age::DecryptError::NoMatchingKeys) => return Err(needs()),
            Err(e) => return Err(SealError::Damaged(format!("age: {e}"))),
        };
        let mut plain = Zeroizing::new(Vec::new());
        reader.read_to_end(&mut plain).map_err(|e| SealError::Damaged(format!("age payload: {e}")))?;
        Ok(plain)
    }
}

/// Whether `stored` is in a sealed form (an age file or a KMS envelope), whoever sealed it.
pub fn is_sealed(stored: &[u8]) -> bool {
    let head = trim_start(stored);
    head.starts_with(AGE_ARMOR) || head.starts_with(AGE_BINARY) || parse_envelope(head).is_some()
}

/// The public key of the first age identity in `settings`, if any parses.
pub fn first_recipient_of(settings: &SealingSettings) -> Option<String> {
    let text = settings.age_identities.as_ref()?;
    parse_identities(text).ok()?.first().map(|i| i.to_public().to_string())
}

fn trim_start(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    &b[start..]
}

/// `Some` when `stored` is (or claims to be) a gitstate KMS envelope.
fn parse_envelope(stored: &[u8]) -> Option<Result<Envelope, SealError>> {
    if !stored.starts_with(b"{") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        gitstate_envelope: Option<serde::de::IgnoredAny>,
    }
    let probe: Probe = serde_json::from_slice(stored).ok()?;
    probe.gitstate_envelope?;
    Some(serde_json::from_slice::<Envelope>(stored).map_err(|e| SealError::Damaged(format!("KMS envelope: {e}"))))
}

fn parse_identities(text: &str) -> Result<Vec<age::x25519::Identity>, SealingConfigError> {
    let identities = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            age::x25519::Identity::from_str(l).map_err(|_| {
                SealingConfigError("an age identity is not an X25519 secret key (AGE-SECRET-KEY-1...)".into())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if identities.is_empty() {
        return Err(SealingConfigError("no age identity found in the identities given".into()));
    }
    Ok(identities)
}

fn seal_age(recipients: &[age::x25519::Recipient], plain: &[u8]) -> Result<Vec<u8>, SealError> {
    let failed = |e: &dyn std::fmt::Display| SealError::Damaged(format!("age encryption failed: {e}"));
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient)).map_err(|e| failed(&e))?;
    let mut out = Vec::with_capacity(plain.len() * 4 / 3 + 512);
    let armor =
        age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor).map_err(|e| failed(&e))?;
    let mut writer = encryptor.wrap_output(armor).map_err(|e| failed(&e))?;
    writer.write_all(plain).map_err(|e| failed(&e))?;
    writer.finish().and_then(|armor| armor.finish()).map_err(|e| failed(&e))?;
    Ok(out)
}

impl Kms {
    /// Run a KMS call on the runtime, bounded by the request's deadline.
    fn call<T, E: std::error::Error + 'static>(
        &self,
        ctx: &RequestContext,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, aws_sdk_kms::error::SdkError<E>>>,
    ) -> Result<T, SealError> {
        let Some(left) = ctx.deadline.remaining() else {
            return Err(SealError::KeyServiceUnavailable(format!("no time left for KMS {what}")));
        };
        match self.runtime.block_on(tokio::time::timeout(left, fut)) {
            Err(_) => Err(SealError::KeyServiceUnavailable(format!("KMS {what} did not answer in time"))),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(kms_error(what, &e)),
        }
    }

    fn seal(&self, ctx: &RequestContext, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let out = self.call(
            ctx,
            "GenerateDataKey",
            self.client
                .generate_data_key()
                .key_id(&self.key_id)
                .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
                .send(),
        )?;
        let key = out.plaintext().map(|b| Zeroizing::new(b.as_ref().to_vec()));
        let wrapped = out.ciphertext_blob().map(|b| b.as_ref().to_vec());
        let (Some(key), Some(wrapped)) = (key, wrapped) else {
            return Err(SealError::KeyServiceRefused("GenerateDataKey returned no key".into()));
        };
        // The envelope names the key by its ARN, so that an alias may later move.
        let key_arn = out.key_id().map(str::to_owned).unwrap_or_else(|| self.key_id.clone());
        self.arns.lock().expect("arns poisoned").insert(self.key_id.clone(), key_arn.clone());
        let cipher = Aes256Gcm::new_from_slice(&key)
            .map_err(|_| SealError::KeyServiceRefused("the data key is not 256 bits".into()))?;
        let nonce: [u8; 12] = rand_nonce();
        let ciphertext = cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .map_err(|_| SealError::Damaged("AES-256-GCM sealing failed".into()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let envelope = Envelope {
            gitstate_envelope: ENVELOPE_VERSION,
            algorithm: ALGORITHM.into(),
            key_id: key_arn,
            wrapped_key: b64.encode(wrapped),
            nonce: b64.encode(nonce),
            ciphertext: b64.encode(ciphertext),
        };
        let mut json = serde_json::to_vec_pretty(&envelope).expect("an envelope serializes");
        json.push(b'\n');
        Ok(json)
    }

    fn open(&self, ctx: &RequestContext, envelope: &Envelope) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if envelope.gitstate_envelope != ENVELOPE_VERSION || envelope.algorithm != ALGORITHM {
            return Err(SealError::Damaged(format!(
                "KMS envelope version {} / algorithm {:?} is not one this gitstate reads",
                envelope.gitstate_envelope, envelope.algorithm
            )));
        }
        if !self.may_open(ctx, &envelope.key_id)? {
            return Err(SealError::CannotOpen {
                needs: format!(
                    "AWS KMS key {} (add it to GITSTATE_KMS_DECRYPT_KEY_IDS to read states sealed under it)",
                    envelope.key_id
                ),
            });
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode = |field: &str, v: &str| {
            b64.decode(v).map_err(|_| SealError::Damaged(format!("KMS envelope: `{field}` is not base64")))
        };
        let wrapped = decode("wrapped_key", &envelope.wrapped_key)?;
        let nonce = decode("nonce", &envelope.nonce)?;
        let ciphertext = decode("ciphertext", &envelope.ciphertext)?;
        if nonce.len() != 12 {
            return Err(SealError::Damaged("KMS envelope: the nonce is not 12 bytes".into()));
        }
        let key = self.data_key(ctx, &envelope.key_id, &wrapped)?;
        let cipher = Aes256Gcm::new_from_slice(key.as_ref()).expect("a 32-byte key");
        cipher
            .decrypt(Nonce::from_slice(&nonce), ciphertext.as_ref())
            .map(Zeroizing::new)
            .map_err(|_| SealError::Damaged("KMS envelope: the ciphertext does not authenticate".into()))
    }

    /// The ARN of a configured key id: itself when it is one, else asked of KMS once.
    fn arn_of(&self, ctx: &RequestContext, id: &str) -> Result<String, SealError> {
        if id.starts_with("arn:") {
            return Ok(id.to_owned());
        }
        if let Some(arn) = self.arns.lock().expect("arns poisoned").get(id) {
            return Ok(arn.clone());
        }
        let out = self.call(ctx, "DescribeKey", self.client.describe_key().key_id(id).send())?;
        let arn = out
            .key_metadata()
            .map(|m| m.arn().unwrap_or(m.key_id()).to_owned())
            .ok_or_else(|| SealError::KeyServiceRefused(format!("DescribeKey of {id} returned no key")))?;
        self.arns.lock().expect("arns poisoned").insert(id.to_owned(), arn.clone());
        Ok(arn)
    }

    /// Whether an envelope under `key` may be opened: it is the sealing key or one of the
    /// rotation list, named as configured or by its ARN.
    fn may_open(&self, ctx: &RequestContext, key: &str) -> Result<bool, SealError> {
        if self.readable.iter().any(|id| id == key) {
            return Ok(true);
        }
        for id in &self.readable {
            if self.arn_of(ctx, id)? == key {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The plaintext data key of `wrapped`, from the warm cache or from KMS `Decrypt`.
    fn data_key(&self, ctx: &RequestContext, key_id: &str, wrapped: &[u8]) -> Result<Zeroizing<[u8; 32]>, SealError> {
        {
            let mut cache = self.data_keys.lock().expect("data_keys poisoned");
            match cache.get(wrapped) {
                Some((at, key)) if at.elapsed() < DATA_KEY_TTL => return Ok(key.clone()),
                Some(_) => {
                    cache.pop(wrapped);
                }
                None => {}
            }
        }
        let out = self.call(
            ctx,
            "Decrypt",
            self.client
                .decrypt()
                .key_id(key_id)
                .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(wrapped.to_vec()))
                .send(),
        )?;
        let plain = out.plaintext().ok_or_else(|| SealError::KeyServiceRefused("Decrypt returned no key".into()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        if plain.as_ref().len() != 32 {
            return Err(SealError::Damaged("KMS envelope: the data key is not 256 bits".into()));
        }
        key.copy_from_slice(plain.as_ref());
        self.data_keys.lock().expect("data_keys poisoned").put(wrapped.to_vec(), (Instant::now(), key.clone()));
        Ok(key)
    }
}

fn rand_nonce() -> [u8; 12] {
    use aes_gcm::aead::{AeadCore, OsRng};
    Aes256Gcm::generate_nonce(&mut OsRng).into()
}

/// Service errors (a refusal) versus everything else (the service not reached).
fn kms_error<E: std::error::Error + 'static>(what: &str, e: &aws_sdk_kms::error::SdkError<E>) -> SealError {
    use aws_sdk_kms::error::SdkError;
    let detail = format!("KMS {what}: {}", aws_sdk_kms::error::DisplayErrorContext(e));
    match e {
        SdkError::ServiceError(s) if s.raw().status().is_server_error() => SealError::KeyServiceUnavailable(detail),
        SdkError::ServiceError(_) => SealError::KeyServiceRefused(detail),
        _ => SealError::KeyServiceUnavailable(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (String, String) {
        use age::secrecy::ExposeSecret;
        let id = age::x25519::Identity::generate();
        (id.to_public().to_string(), id.to_string().expose_secret().to_string())
    }

    fn sealing(recipients: &[&str], identities: &[&str]) -> Sealing {
        let settings = SealingSettings {
            age_recipients: recipients.iter().map(|s| s.to_string()).collect(),
            age_identities: (!identities.is_empty()).then(|| Zeroizing::new(identities.join("\n"))),
            ..Default::default()
        };
        Sealing::new(&settings, None).unwrap()
    }

    #[test]
    fn age_round_trip_rotation_and_clear_states() {
        let ctx = RequestContext::unbounded();
        let (old_pub, old_key) = keys();
        let (new_pub, new_key) = keys();
        let state = br#"{"version":4,"serial":1,"lineage":"L","outputs":{"pw":{"value":"hunter2"}}}"#;
        let old = sealing(&[&old_pub], &[&old_key]);
        let sealed = old.seal(&ctx, state).unwrap();
        assert!(sealed.starts_with(AGE_ARMOR));
        assert!(!String::from_utf8_lossy(&sealed).contains("hunter2"));
        assert_eq!(old.open(&ctx, &sealed).unwrap().as_slice(), state);
        // Rotation: both identities read, the new recipient writes.
        let rotated = sealing(&[&new_pub], &[&old_key, &new_key]);
        assert_eq!(rotated.open(&ctx, &sealed).unwrap().as_slice(), state);
        let resealed = rotated.seal(&ctx, state).unwrap();
        match old.open(&ctx, &resealed) {
            Err(SealError::CannotOpen { needs }) => assert!(needs.contains(&old_pub), "{needs}"),
            other => panic!("{other:?}"),
        }
        // A state stored before encryption was turned on is served as it is, and written again.
        assert_eq!(old.open(&ctx, state).unwrap().as_slice(), state);
        assert!(old.needs_reseal(&ctx, state).unwrap());
        assert!(!old.needs_reseal(&ctx, &sealed).unwrap());
        assert!(!Sealing::clear().needs_reseal(&ctx, state).unwrap());
        // Sealed to a recipient rotated out: written again; sealed to the current one: not.
        assert!(rotated.needs_reseal(&ctx, &sealed).unwrap());
        assert!(!rotated.needs_reseal(&ctx, &resealed).unwrap());
        // Without identities an age file is never served as state.
        assert!(matches!(Sealing::clear().open(&ctx, &sealed), Err(SealError::CannotOpen { .. })));
    }

    #[test]
    fn settings_that_would_lose_or_leak_are_refused() {
        let (public, secret) = keys();
        let try_new = |s: SealingSettings| Sealing::new(&s, None);
        let ids = || Some(Zeroizing::new(secret.clone()));
        assert!(try_new(SealingSettings { age_recipients: vec![public.clone()], ..Default::default() }).is_err());
        assert!(try_new(SealingSettings { age_identities: ids(), ..Default::default() }).is_err());
        assert!(try_new(SealingSettings {
            age_recipients: vec!["age1nope".into()],
            age_identities: ids(),
            ..Default::default()
        })
        .is_err());
        assert!(try_new(SealingSettings {
            age_recipients: vec![public.clone()],
            age_identities: ids(),
            kms_key_id: Some("alias/x".into()),
            ..Default::default()
        })
        .is_err());
        let e = try_new(SealingSettings {
            age_recipients: vec![public],
            age_identities: Some(Zeroizing::new("AGE-SECRET-KEY-1NOTAKEY".into())),
            ..Default::default()
        })
        .unwrap_err();
        assert!(!e.to_string().contains("NOTAKEY"), "the error repeats the secret: {e}");
        assert!(!Sealing::clear().encrypts());
    }

    #[test]
    fn envelopes_are_recognised_and_need_their_key() {
        let ctx = RequestContext::unbounded();
        let envelope = br#"{"gitstate_envelope":1,"algorithm":"AES-256-GCM","key_id":"alias/states","wrapped_key":"AA==","nonce":"AA==","ciphertext":"AA=="}"#;
        match Sealing::clear().open(&ctx, envelope) {
            Err(SealError::CannotOpen { needs }) => assert!(needs.contains("alias/states"), "{needs}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(Sealing::clear().open(&ctx, br#"{"gitstate_envelope":1}"#), Err(SealError::Damaged(_))));
        // An ordinary state is not an envelope.
        assert!(Sealing::clear().open(&ctx, br#"{"version":4}"#).is_ok());
    }
}
