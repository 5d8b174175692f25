//! Identities of relays, clients and the validator: sr25519 signing key pairs (schnorrkel).
//!
//! Signatures use the signing context `b"substrate"`, the one Substrate and Bittensor keypairs
//! sign with, so a relay whose identity is its Bittensor hotkey produces signatures the
//! validator verifies. Only public keys ever leave a process; a key file holds the 32-byte
//! secret seed and is created with mode 0600.

use crate::error::{Error, Result};
use schnorrkel::{ExpansionMode, Keypair, MiniSecretKey, PublicKey, Signature};
use std::path::Path;

/// Signing context of every signature (Substrate's).
pub const SIGNING_CONTEXT: &[u8] = b"substrate";
/// Bytes of a public key.
pub const PUBLIC_LEN: usize = 32;
/// Bytes of a signature.
pub const SIGNATURE_LEN: usize = 64;

/// A signing key pair.
pub struct Identity {
    keypair: Keypair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.id())
    }
}

impl Identity {
    /// A fresh key pair from OS randomness.
    pub fn generate() -> Identity {
        Identity::from_seed(&crate::wire::nonce())
    }

    /// The key pair of a 32-byte seed, expanded as Substrate expands sr25519 seeds.
    pub fn from_seed(seed: &[u8; 32]) -> Identity {
        let mini = MiniSecretKey::from_bytes(seed).expect("32-byte seed");
        Identity {
            keypair: mini.expand_to_keypair(ExpansionMode::Ed25519),
        }
    }

    pub fn public(&self) -> [u8; PUBLIC_LEN] {
        self.keypair.public.to_bytes()
    }

    /// The identity as it appears in tables and on the wire: the public key in hex.
    pub fn id(&self) -> String {
        crate::config::to_hex(&self.public())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.keypair.sign_simple(SIGNING_CONTEXT, msg).to_bytes()
    }

    /// Read the key file at `path` (the seed in hex, or a Bittensor/Substrate key file in JSON
    /// with a `secretSeed` field), or create one there with a fresh seed, mode 0600.
    pub fn load_or_create(path: &Path, what: &str) -> Result<Identity> {
        if path.exists() {
            return Identity::load(path);
        }
        let seed = crate::wire::nonce();
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create key file {}", path.display()), e))?;
        std::io::Write::write_all(&mut f, crate::config::to_hex(&seed).as_bytes())
            .map_err(|e| Error::io(format!("cannot write key file {}", path.display()), e))?;
        let id = Identity::from_seed(&seed);
        log::info!(
            "created {what} key {} (public key {})",
            path.display(),
            id.id()
        );
        Ok(id)
    }

    /// Read a key file written by [`Identity::load_or_create`] or by a Bittensor wallet.
    pub fn load(path: &Path) -> Result<Identity> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read key file {}", path.display()), e))?;
        let hex = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(o)) => o
                .get("secretSeed")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "key file {} is JSON without a secretSeed",
                        path.display()
                    ))
                })?,
            _ => text,
        };
        let seed: [u8; 32] = crate::config::parse_hex(
            &format!("key file {}", path.display()),
            hex.trim().trim_start_matches("0x"),
        )?
        .try_into()
        .map_err(|_| {
            Error::invalid(format!(
                "key file {} does not hold a 32-byte seed",
                path.display()
            ))
        })?;
        Ok(Identity::from_seed(&seed))
    }
}

/// Whether `sig` is `public`'s signature of `msg`.
pub fn verify(public: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let (Ok(p), Ok(s)) = (PublicKey::from_bytes(public), Signature::from_bytes(sig)) else {
        return false;
    };
    p.verify_simple(SIGNING_CONTEXT, msg, &s).is_ok()
}

/// Parse an identity given in hex (64 digits, optionally `0x`-prefixed).
pub fn parse_public(what: &str, s: &str) -> Result<[u8; PUBLIC_LEN]> {
    crate::config::parse_hex(what, s.trim().trim_start_matches("0x"))?
        .try_into()
        .map_err(|_| Error::invalid(format!("{what} is not a 32-byte public key")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key pair and signature made by the Bittensor SDK (11.x) from the seed 00 01 .. 1f: the
    /// same seed gives the same public key here, and the SDK's signature verifies.
    #[test]
    fn bittensor_keypairs_and_signatures_line_up() {
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        let id = Identity::from_seed(&seed);
        assert_eq!(
            id.id(),
            "e2111779981618705ecacea1af6ff9350bce2b2dccd03e0c3e01eb0c823d2666"
        );
        let sig = crate::config::parse_hex(
            "sig",
            "baeb3310d054583de5726a6bb6edd785ef7455ed67077cbe601d8b09640bfb60\
             05ea2ddfd7f4a82c71145a20a15474b02a61d53f14f83571b92bf3c217ac8783",
        )
        .unwrap();
        let sig: [u8; SIGNATURE_LEN] = sig.try_into().unwrap();
        assert!(verify(&id.public(), b"mapreduce interop", &sig));
        assert!(!verify(&id.public(), b"mapreduce interoq", &sig));
    }

    #[test]
    fn signatures_verify_only_for_their_key_and_message() {
        let a = Identity::generate();
        let b = Identity::generate();
        let sig = a.sign(b"hello");
        assert!(verify(&a.public(), b"hello", &sig));
        assert!(!verify(&a.public(), b"hellO", &sig));
        assert!(!verify(&b.public(), b"hello", &sig));
        assert!(!verify(&[0u8; 31], b"hello", &sig));
    }

    /// Substrate's well-known development key //Alice: seed → public key, as every Substrate
    /// and Bittensor keypair derives it.
    #[test]
    fn seeds_expand_as_substrate_expands_them() {
        let seed = crate::config::parse_hex(
            "seed",
            "e5be9a5092b81bca64be81d212e7f2f9eba183bb7a90954f7b76361f6edb5c0a",
        )
        .unwrap();
        let id = Identity::from_seed(&seed.try_into().unwrap());
        assert_eq!(
            id.id(),
            "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d"
        );
    }

    #[test]
    fn key_files_are_private_and_reload() {
        let dir = std::env::temp_dir().join(format!("mr-identity-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("k");
        let _ = std::fs::remove_file(&p);
        let a = Identity::load_or_create(&p, "test").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Identity::load(&p).unwrap().id(), a.id());
        let json = dir.join("hotkey.json");
        std::fs::write(
            &json,
            r#"{"secretSeed": "0xe5be9a5092b81bca64be81d212e7f2f9eba183bb7a90954f7b76361f6edb5c0a"}"#,
        )
        .unwrap();
        assert!(Identity::load(&json).unwrap().id().starts_with("d43593c7"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
