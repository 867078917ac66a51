//! `PeerAuthentication` spec: which mTLS mode a workload's inbound connections require.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::common::WorkloadSelector;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    /// Ignored by Istio when the policy lives in the root namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per workload (target) port overrides; requires a non-empty selector. Keys are 1..65535.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u32, MutualTls>,
}

impl PeerAuthentication {
    /// The workload-level mode (`UNSET` when `mtls` is absent).
    pub fn mode(&self) -> MtlsMode {
        self.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
    }

    /// The explicit mode for `port`, if one is configured.
    pub fn port_mode(&self, port: u16) -> Option<MtlsMode> {
        self.port_level_mtls.get(&u32::from(port)).map(|m| m.mode)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default, skip_serializing_if = "MtlsMode::is_unset")]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent level; PERMISSIVE if nothing is set anywhere.
    #[default]
    Unset,
    /// Plaintext only (no mTLS tunnel).
    Disable,
    /// Plaintext or mTLS.
    Permissive,
    /// mTLS with a client certificate required.
    Strict,
}

impl MtlsMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }

    fn is_unset(&self) -> bool {
        *self == MtlsMode::Unset
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
