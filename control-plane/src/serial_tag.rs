//! The node tag a workload certificate's serial starts with, so that revoking a node revokes every workload
//! certificate it was ever issued without the store recording any of them: the revocation list names the tag
//! (`Revocations.nodes`) and the proxies refuse a peer certificate whose serial starts with it.
//!
//! The tag is derived from the node's name (SHA-256 under a fixed label, [`SERIAL_TAG_BYTES`] bytes), so every
//! replica computes the same one from the node's record with nothing stored or read. A node name is never reused
//! for another node: its record is never deleted and a revoked node cannot join again. Its first byte has the top
//! bit clear (a positive DER integer) and the next one set (no leading zero byte, so the serial's magnitude, in hex,
//! starts with the tag's hex exactly).

use trellis_proto::SERIAL_TAG_BYTES;

/// Domain separation for the hash (changing it would change every node's tag).
const LABEL: &[u8] = b"trellis node serial tag v1\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeTag([u8; SERIAL_TAG_BYTES]);

impl NodeTag {
    /// The tag of the node named `node`.
    pub fn of(node: &str) -> NodeTag {
        let mut input = LABEL.to_vec();
        input.extend_from_slice(node.as_bytes());
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
        let mut tag = [0u8; SERIAL_TAG_BYTES];
        tag.copy_from_slice(&digest.as_ref()[..SERIAL_TAG_BYTES]);
        tag[0] = (tag[0] & 0x7f) | 0x40;
        NodeTag(tag)
    }

    pub fn bytes(&self) -> &[u8; SERIAL_TAG_BYTES] {
        &self.0
    }

    /// Lower-case hex, as the revocation list carries it.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_stable_distinct_and_start_a_positive_minimal_serial() {
        assert_eq!(NodeTag::of("n1"), NodeTag::of("n1"));
        assert_ne!(NodeTag::of("n1"), NodeTag::of("n2"));
        for node in ["n1", "n2", "a-much-longer-node-name", ""] {
            let first = NodeTag::of(node).bytes()[0];
            assert_eq!(first & 0xc0, 0x40, "{node}: {first:#x}");
            assert_eq!(NodeTag::of(node).hex().len(), 2 * SERIAL_TAG_BYTES);
        }
    }
}
