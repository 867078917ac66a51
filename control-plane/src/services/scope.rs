//! What one proxy receives: the per-proxy view of a [`Snapshot`].
//!
//! Resources are scoped: an `AuthorizationPolicy`, `PeerAuthentication` or `RequestAuthentication` selects
//! workloads of its own namespace only, except in the root namespace, where it applies to every workload of the
//! mesh (`trellis-policy`'s `CompiledPolicies::compile`). Policies are enforced where a connection arrives (the
//! destination's proxy), never by the caller's proxy, so a proxy needs exactly the resources of its workloads'
//! namespaces and of its root namespace. The registry is not scoped: any workload may dial any other, so outbound
//! routing (destination address → its proxy and SPIFFE ID) needs every entry; it goes out as deltas instead
//! (`discovery::diff`). The trust bundle, JWKS documents and revocations are mesh-wide.

use std::collections::BTreeSet;
use std::sync::Arc;

use trellis_proto::v1 as pb;

use crate::mesh::Snapshot;

/// Which resources a proxy receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every resource: a proxy that did not tell its root namespace (an older proxy), so that nothing it needs is
    /// withheld.
    Everything,
    /// Resources of these namespaces only: the proxy's workloads' namespaces and its root namespace.
    Namespaces(BTreeSet<String>),
}

impl Scope {
    /// The scope a proxy's Hello asks for.
    pub fn of(hello: &pb::Hello) -> Self {
        if hello.root_namespace.is_empty() {
            return Scope::Everything;
        }
        let mut namespaces: BTreeSet<String> = hello.workloads.iter().map(|w| w.namespace.clone()).collect();
        namespaces.insert(hello.root_namespace.clone());
        Scope::Namespaces(namespaces)
    }

    /// Whether the proxy receives this resource.
    pub fn admits(&self, resource: &pb::Resource) -> bool {
        match self {
            Scope::Everything => true,
            Scope::Namespaces(namespaces) => resource.key.as_ref().is_some_and(|k| namespaces.contains(&k.namespace)),
        }
    }

    /// The snapshot's resources the proxy receives, by store key.
    pub fn resources<'a>(
        &'a self,
        snapshot: &'a Snapshot,
    ) -> impl Iterator<Item = (&'a String, &'a Arc<pb::Resource>)> + 'a {
        snapshot.resources.iter().filter(move |(_, r)| self.admits(r))
    }

    /// Whether the proxy receives the resource stored under `key` in `snapshot`.
    pub fn holds(&self, snapshot: &Snapshot, key: &str) -> bool {
        snapshot.resources.get(key).is_some_and(|r| self.admits(r))
    }

    /// A bounded label for logs and metrics.
    pub fn describe(&self) -> String {
        match self {
            Scope::Everything => "every namespace".into(),
            Scope::Namespaces(namespaces) => namespaces.iter().cloned().collect::<Vec<_>>().join(","),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(namespace: &str) -> pb::Workload {
        pb::Workload { name: "w".into(), namespace: namespace.into(), ..Default::default() }
    }

    fn resource(namespace: &str, name: &str) -> Arc<pb::Resource> {
        Arc::new(pb::Resource {
            key: Some(pb::ResourceKey {
                kind: "AuthorizationPolicy".into(),
                namespace: namespace.into(),
                name: name.into(),
            }),
            revision: 1,
            json: "{}".into(),
        })
    }

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        for (ns, name) in [("a", "p"), ("b", "p"), ("trellis-system", "mesh"), ("c", "q"), ("other-root", "x")] {
            s.resources.insert(format!("AuthorizationPolicy/{ns}/{name}"), resource(ns, name));
        }
        s
    }

    #[test]
    fn a_proxy_receives_its_workloads_namespaces_and_its_root_namespace() {
        let hello = pb::Hello {
            workloads: vec![workload("a"), workload("c"), workload("a")],
            root_namespace: "trellis-system".into(),
            ..Default::default()
        };
        let scope = Scope::of(&hello);
        assert_eq!(scope.describe(), "a,c,trellis-system");
        let s = snapshot();
        let keys: Vec<&str> = scope.resources(&s).map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["AuthorizationPolicy/a/p", "AuthorizationPolicy/c/q", "AuthorizationPolicy/trellis-system/mesh"]
        );
        assert!(!scope.holds(&s, "AuthorizationPolicy/b/p"), "another namespace's policy cannot select a or c");
        assert!(!scope.holds(&s, "AuthorizationPolicy/other-root/x"));
        assert!(!scope.holds(&s, "AuthorizationPolicy/a/missing"));
    }

    #[test]
    fn the_root_namespace_is_the_proxys_own() {
        let hello =
            pb::Hello { workloads: vec![workload("a")], root_namespace: "other-root".into(), ..Default::default() };
        let s = snapshot();
        let scope = Scope::of(&hello);
        let keys: Vec<&str> = scope.resources(&s).map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["AuthorizationPolicy/a/p", "AuthorizationPolicy/other-root/x"]);
    }

    #[test]
    fn a_proxy_without_workloads_receives_the_root_namespace_only() {
        let hello = pb::Hello { root_namespace: "trellis-system".into(), ..Default::default() };
        let s = snapshot();
        assert_eq!(Scope::of(&hello).resources(&s).count(), 1);
    }

    #[test]
    fn a_proxy_that_names_no_root_namespace_receives_everything() {
        let hello = pb::Hello { workloads: vec![workload("a")], ..Default::default() };
        let scope = Scope::of(&hello);
        assert_eq!(scope, Scope::Everything);
        assert_eq!(scope.resources(&snapshot()).count(), 5);
    }

    #[test]
    fn a_resource_without_a_key_is_never_in_a_namespace_scope() {
        let keyless = pb::Resource::default();
        assert!(!Scope::Namespaces(["a".to_owned()].into()).admits(&keyless));
        assert!(Scope::Everything.admits(&keyless));
    }
}
