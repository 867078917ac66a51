//! Revocations the control plane pushes (`ConfigUpdate.revocations`): revoked nodes, by the tag that starts the
//! serial of every workload certificate issued to them and by the serials of their other certificates, and revoked
//! workload identities, by SPIFFE ID. The TLS verifiers of both sides read the current set at every
//! handshake ([`RevocationList`]) and refuse a peer certificate it names; when the set changes, `reconfigure`
//! closes every open connection whose peer certificate it names (both directions, see `connections` and
//! `proxy::pool`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use trellis_proto::SERIAL_TAG_BYTES;
use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1;

/// One applied revocation set. Immutable; replaced whole.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revocations {
    /// Serial (lower-case hex of its magnitude) → the node it was issued to.
    serials: HashMap<String, String>,
    /// Serial tag (the hex of a serial's first [`SERIAL_TAG_BYTES`]) → the revoked node it names.
    tags: HashMap<String, String>,
    identities: HashSet<SpiffeId>,
}

/// Why a peer certificate is refused: what the access log and the refusing side's log say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    #[error("peer certificate {serial} was issued to revoked node {node:?}")]
    Node { node: String, serial: String },
    #[error("peer identity {0} was revoked")]
    Identity(SpiffeId),
}

impl Revoked {
    /// The `kind` label of `trellis_revocations_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Revoked::Node { .. } => "node",
            Revoked::Identity(_) => "identity",
        }
    }

    /// Counts what a revocation did: `closed` (an open connection) or `refused` (a new handshake).
    pub fn count(&self, action: &'static str) {
        metrics::counter!("trellis_revocations_total", "kind" => self.kind(), "action" => action).increment(1);
    }
}

/// A revocation list the proxy cannot apply (NACKed with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationsError {
    #[error("certificates[{index}]: serial {serial:?} is not hexadecimal")]
    Serial { index: usize, serial: String },
    #[error("identities[{index}]: {reason}")]
    Identity { index: usize, reason: String },
    #[error("nodes[{index}]: serial_tag {tag:?} is not {} hexadecimal digits", 2 * SERIAL_TAG_BYTES)]
    Tag { index: usize, tag: String },
}

impl Revocations {
    pub fn from_wire(list: &v1::Revocations) -> Result<Self, RevocationsError> {
        let mut serials = HashMap::with_capacity(list.certificates.len());
        for (index, cert) in list.certificates.iter().enumerate() {
            let serial = normalize_serial(&cert.serial)
                .ok_or_else(|| RevocationsError::Serial { index, serial: cert.serial.clone() })?;
            serials.insert(serial, cert.node.clone());
        }
        let mut tags = HashMap::with_capacity(list.nodes.len());
        for (index, node) in list.nodes.iter().enumerate() {
            let tag = normalize_serial(&node.serial_tag)
                .filter(|tag| tag.len() == 2 * SERIAL_TAG_BYTES)
                .ok_or_else(|| RevocationsError::Tag { index, tag: node.serial_tag.clone() })?;
            tags.insert(tag, node.node.clone());
        }
        let identities = list
            .identities
            .iter()
            .enumerate()
            .map(|(index, revoked)| {
                SpiffeId::parse(&revoked.spiffe_id)
                    .map_err(|e| RevocationsError::Identity { index, reason: format!("{:?}: {e}", revoked.spiffe_id) })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { serials, tags, identities })
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty() && self.tags.is_empty() && self.identities.is_empty()
    }

    /// Whether a peer holding the certificate with `serial` naming `id` is revoked.
    pub fn check(&self, serial: &str, id: &SpiffeId) -> Result<(), Revoked> {
        if self.identities.contains(id) {
            return Err(Revoked::Identity(id.clone()));
        }
        let tagged = || serial.get(..2 * SERIAL_TAG_BYTES).and_then(|tag| self.tags.get(tag));
        match self.serials.get(serial).or_else(tagged) {
            Some(node) => Err(Revoked::Node { node: node.clone(), serial: serial.to_owned() }),
            None => Ok(()),
        }
    }

    /// [`Revocations::check`] for a certificate at handshake: parsed only when some serial or node tag is revoked.
    pub fn check_cert(&self, cert: &CertificateDer<'_>, id: &SpiffeId) -> Result<(), Revoked> {
        if self.identities.contains(id) {
            return Err(Revoked::Identity(id.clone()));
        }
        if self.serials.is_empty() && self.tags.is_empty() {
            return Ok(());
        }
        self.check(&serial_hex(cert).unwrap_or_default(), id)
    }
}

/// Lower-case hex of a certificate's serial magnitude (no DER sign byte), as `/certs` and the control plane show it.
pub fn serial_hex(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let serial = match parsed.raw_serial() {
        [0, rest @ ..] if rest.first().is_some_and(|b| b & 0x80 != 0) => rest,
        other => other,
    };
    Some(hex::encode(serial))
}

fn normalize_serial(serial: &str) -> Option<String> {
    let serial = serial.to_ascii_lowercase();
    (!serial.is_empty() && serial.len().is_multiple_of(2) && serial.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(serial)
}

/// The current set, read by the TLS verifiers at each handshake and replaced whole by `reconfigure` on a change.
#[derive(Debug, Default)]
pub struct RevocationList(ArcSwap<Revocations>);

impl RevocationList {
    pub fn load(&self) -> Arc<Revocations> {
        self.0.load_full()
    }

    pub fn store(&self, revocations: Arc<Revocations>) {
        self.0.store(revocations);
    }

    /// The verifiers' check: the current set, without cloning its `Arc`.
    pub fn check_cert(&self, cert: &CertificateDer<'_>, id: &SpiffeId) -> Result<(), Revoked> {
        self.0.load().check_cert(cert, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::revocations as list;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::workload("td.test", "ns", sa).unwrap()
    }

    #[test]
    fn a_revoked_serial_or_identity_is_refused_and_nothing_else() {
        let set = Revocations::from_wire(&list(&[("0A1B", "n1")], &[&id("bad").to_string()])).unwrap();
        assert_eq!(set.check("0a1b", &id("good")), Err(Revoked::Node { node: "n1".into(), serial: "0a1b".into() }));
        assert_eq!(set.check("ffff", &id("bad")), Err(Revoked::Identity(id("bad"))));
        assert_eq!(
            set.check("0a1b", &id("good")).unwrap_err().to_string(),
            "peer certificate 0a1b was issued to revoked node \"n1\""
        );
        assert_eq!(
            set.check("ffff", &id("bad")).unwrap_err().to_string(),
            format!("peer identity {} was revoked", id("bad"))
        );
        // Control: another serial of the same identity as a revoked node's certificate, another identity.
        assert_eq!(set.check("ffff", &id("good")), Ok(()));
    }

    /// A serial that starts with a revoked node's tag is refused, as the node's revoked serial would be; a serial
    /// with another node's tag, or too short to carry one, is not.
    #[test]
    fn a_serial_carrying_a_revoked_nodes_tag_is_refused_and_no_other() {
        let set = Revocations::from_wire(&crate::testing::revoked_tags(&[("40AABBCCDDEEFF00", "n1")])).unwrap();
        let serial = "40aabbccddeeff00112233445566778899aabbcc";
        assert_eq!(set.check(serial, &id("good")), Err(Revoked::Node { node: "n1".into(), serial: serial.into() }));
        assert_eq!(
            set.check(serial, &id("good")).unwrap_err().to_string(),
            format!("peer certificate {serial} was issued to revoked node \"n1\"")
        );
        // Control: another node's tag, the tag elsewhere than at the start, a serial shorter than a tag.
        assert_eq!(set.check("41aabbccddeeff00112233445566778899aabbcc", &id("good")), Ok(()));
        assert_eq!(set.check("0040aabbccddeeff00", &id("good")), Ok(()));
        assert_eq!(set.check("40aabbcc", &id("good")), Ok(()));
        assert!(!set.is_empty());
    }

    #[test]
    fn a_list_it_cannot_read_is_refused_naming_the_entry() {
        let err =
            Revocations::from_wire(&crate::testing::revoked_tags(&[("40aabbccddeeff00", "n1"), ("40aabb", "n2")]))
                .unwrap_err();
        assert_eq!(err.to_string(), "nodes[1]: serial_tag \"40aabb\" is not 16 hexadecimal digits");
        let err = Revocations::from_wire(&list(&[("ab", "n1"), ("xyz", "n1")], &[])).unwrap_err();
        assert_eq!(err.to_string(), "certificates[1]: serial \"xyz\" is not hexadecimal");
        let err = Revocations::from_wire(&list(&[], &["not-an-id"])).unwrap_err();
        assert!(err.to_string().starts_with("identities[0]: \"not-an-id\": "), "{err}");
        assert!(Revocations::from_wire(&list(&[], &[])).unwrap().is_empty());
    }
}
