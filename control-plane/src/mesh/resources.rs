//! Resources (AuthorizationPolicy, PeerAuthentication, RequestAuthentication): apply all-or-nothing, its dry
//! run, delete.

use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_proto::v1 as pb;

use super::{Mesh, MeshError, to_pb_resource};
use crate::records::{self, META_REVISION, META_VERSION, ResourceRecord};
use crate::store::Table;

impl Mesh {
    /// Parses and validates every document, then refuses `jwksUri` hosts that are local addresses (unless
    /// allowed): the control plane would fetch them every refresh.
    fn parse(&self, text: &str) -> Result<Vec<trellis_policy::Resource>, MeshError> {
        let parsed = trellis_policy::parse_documents(text).map_err(|e| MeshError::InvalidArgument(e.to_string()))?;
        if !self.config.jwks_allow_local {
            let refusals: Vec<String> = parsed.iter().flat_map(local_jwks_uris).collect();
            if !refusals.is_empty() {
                return Err(MeshError::InvalidArgument(refusals.join("\n")));
            }
        }
        Ok(parsed)
    }

    /// Applies every document of `text`, or none of them.
    pub fn apply(&self, text: &str) -> Result<Vec<pb::AppliedResource>, MeshError> {
        let parsed = self.parse(text)?;
        if parsed.is_empty() {
            return Err(MeshError::InvalidArgument("no documents to apply".into()));
        }
        let (results, changed) = self.write(
            |txn| {
                let mut results = Vec::new();
                let mut changed = Vec::new();
                for resource in &parsed {
                    let key = resource.key();
                    let kind = key.kind.to_string();
                    let store_key = records::resource_store_key(&kind, &key.namespace, &key.name);
                    let json = resource.to_json();
                    let existing: Option<ResourceRecord> = records::get(txn, Table::Resources, &store_key)?;
                    let (revision, outcome) = match &existing {
                        Some(old) if old.json == json => (old.revision, "unchanged"),
                        _ => {
                            let revision = records::bump(txn, META_REVISION)?;
                            let record = ResourceRecord {
                                kind: kind.clone(),
                                namespace: key.namespace.clone(),
                                name: key.name.clone(),
                                revision,
                                json,
                            };
                            records::put(txn, Table::Resources, &store_key, &record)?;
                            changed.push(record);
                            (revision, if existing.is_some() { "configured" } else { "created" })
                        }
                    };
                    results.push(pb::AppliedResource {
                        key: Some(pb::ResourceKey { kind, namespace: key.namespace.clone(), name: key.name.clone() }),
                        revision,
                        outcome: format!("{outcome}{}", applicability_note(resource)),
                    });
                }
                let version = if changed.is_empty() { None } else { Some(records::bump(txn, META_VERSION)?) };
                Ok(((results, changed), version))
            },
            |(_, changed), snapshot| {
                for record in changed {
                    snapshot.resources.insert(record.store_key(), Arc::new(to_pb_resource(record)));
                }
            },
        )?;
        if !changed.is_empty() {
            tracing::info!(changed = changed.len(), version = self.current().version, "resources applied");
        }
        Ok(results)
    }

    /// What `apply` would do, without storing anything: per resource the outcome, and per registered workload its
    /// applicable policies before and after.
    pub fn apply_dry_run(
        &self,
        text: &str,
        root_namespace: &str,
    ) -> Result<(Vec<pb::AppliedResource>, Vec<pb::WorkloadPolicyChange>), MeshError> {
        let parsed = self.parse(text)?;
        let snapshot = self.current();
        let mut before: BTreeMap<String, trellis_policy::Resource> = BTreeMap::new();
        for (key, r) in &snapshot.resources {
            let resource = trellis_policy::Resource::from_json(&r.json)
                .map_err(|e| MeshError::InvalidArgument(format!("stored resource {key}: {e}")))?;
            before.insert(key.clone(), resource);
        }
        let mut after = before.clone();
        let mut results = Vec::new();
        for resource in parsed {
            let key = resource.key();
            let kind = key.kind.to_string();
            let store_key = records::resource_store_key(&kind, &key.namespace, &key.name);
            let outcome = match before.get(&store_key) {
                Some(old) if old.to_json() == resource.to_json() => "unchanged",
                Some(_) => "configured",
                None => "created",
            };
            results.push(pb::AppliedResource {
                key: Some(pb::ResourceKey { kind, namespace: key.namespace.clone(), name: key.name.clone() }),
                revision: 0,
                outcome: format!("{outcome} (dry run){}", applicability_note(&resource)),
            });
            after.insert(store_key, resource);
        }
        let compile = |set: &BTreeMap<String, trellis_policy::Resource>| {
            let list: Vec<_> = set.values().cloned().collect();
            trellis_policy::CompiledPolicies::compile(&list, root_namespace)
                .map_err(|e| MeshError::InvalidArgument(e.to_string()))
        };
        let (old, new) = (compile(&before)?, compile(&after)?);
        let describe = |policies: &trellis_policy::WorkloadPolicies| -> Vec<String> {
            let mut out: Vec<String> = policies
                .policies()
                .map(|(ns, name, action, dry_run)| {
                    format!("{ns}/{name} ({action:?}{})", if dry_run { ", dry-run" } else { "" })
                })
                .collect();
            out.sort();
            out
        };
        let mut changes = Vec::new();
        for (key, w) in &snapshot.workloads {
            let labels: BTreeMap<String, String> = w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let (b, a) = (
                describe(&old.for_workload(&w.namespace, &labels)),
                describe(&new.for_workload(&w.namespace, &labels)),
            );
            changes.push(pb::WorkloadPolicyChange { workload: key.clone(), before: b, after: a });
        }
        Ok((results, changes))
    }

    /// Deletes every key, or none if any is missing.
    pub fn delete(&self, keys: &[pb::ResourceKey]) -> Result<Vec<pb::ResourceKey>, MeshError> {
        let store_keys: Vec<String> = keys
            .iter()
            .map(|k| {
                let kind: trellis_policy::Kind =
                    k.kind.parse().map_err(|_| MeshError::InvalidArgument(format!("unknown kind {:?}", k.kind)))?;
                Ok(records::resource_store_key(kind.as_str(), &k.namespace, &k.name))
            })
            .collect::<Result<_, MeshError>>()?;
        self.write(
            |txn| {
                let mut missing = Vec::new();
                for key in &store_keys {
                    if txn.get(Table::Resources, key)?.is_none() {
                        missing.push(key.clone());
                    } else {
                        txn.delete(Table::Resources, key)?;
                    }
                }
                if !missing.is_empty() {
                    return Err(MeshError::NotFound(format!("not found: {}", missing.join(", "))));
                }
                let version = if store_keys.is_empty() { None } else { Some(records::bump(txn, META_VERSION)?) };
                Ok(((), version))
            },
            |_, snapshot| {
                for key in &store_keys {
                    snapshot.resources.remove(key);
                }
            },
        )?;
        Ok(keys.to_vec())
    }
}

/// Said with the apply outcome when a resource is stored but proxies will not enforce it (as Istio's sidecars).
fn applicability_note(resource: &trellis_policy::Resource) -> &'static str {
    match resource.authorization_policy() {
        Some(p) if p.target_ref.is_some() || !p.target_refs.is_empty() => {
            " (has targetRefs: applies to gateways and waypoints, not enforced by proxies)"
        }
        _ => "",
    }
}

/// `Kind ns/name: spec.jwtRules[i].jwksUri: "uri": why` for each `jwksUri` of `resource` whose host is local.
fn local_jwks_uris(resource: &trellis_policy::Resource) -> Vec<String> {
    let trellis_policy::Spec::RequestAuthentication(ra) = &resource.spec else { return Vec::new() };
    let key = resource.key();
    ra.jwt_rules
        .iter()
        .enumerate()
        // A rule with inline `jwks` is not fetched.
        .filter(|(_, rule)| rule.jwks.is_empty())
        .filter_map(|(i, rule)| {
            let refusal = crate::jwks_host::literal_host(&rule.jwks_uri)?;
            Some(format!(
                "{} {}/{}: spec.jwtRules[{i}].jwksUri: {:?}: {refusal}",
                key.kind, key.namespace, key.name, rule.jwks_uri
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use trellis_proto::v1 as pb;

    use crate::mesh::testing::{TestMesh, refusal};
    use crate::records::resource_store_key;

    const ALLOW: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow, namespace: shop}\nspec: {action: ALLOW, rules: [{}]}\n";
    /// DENY without rules: refused by validation.
    const BAD: &str =
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad}\nspec: {action: DENY}\n";

    fn key(namespace: &str, name: &str) -> pb::ResourceKey {
        pb::ResourceKey { kind: "AuthorizationPolicy".into(), namespace: namespace.into(), name: name.into() }
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let mesh = TestMesh::new();
        let before = mesh.current().version;
        let other = ALLOW.replace("name: allow", "name: other");
        let err = mesh.apply(&format!("{other}---\n{BAD}")).unwrap_err();
        let (kind, message) = refusal(&err);
        assert_eq!(kind, "InvalidArgument");
        assert!(
            message
                .starts_with("document 2 (AuthorizationPolicy default/bad): spec.rules: DENY action without `rules`"),
            "{message}"
        );
        assert!(mesh.current().resources.is_empty(), "the valid document was stored");
        assert_eq!(mesh.current().version, before);

        // Control: the valid document alone is applied, once.
        let applied = mesh.apply(&other).unwrap();
        assert_eq!(applied[0].outcome, "created");
        assert!(mesh.current().resources.contains_key(&resource_store_key("AuthorizationPolicy", "shop", "other")));
        assert_eq!(mesh.current().version, before + 1);
        assert_eq!(mesh.apply(&other).unwrap()[0].outcome, "unchanged");
        assert_eq!(mesh.current().version, before + 1, "an unchanged apply publishes nothing");
    }

    #[test]
    fn apply_refuses_an_empty_text() {
        let mesh = TestMesh::new();
        assert_eq!(
            refusal(&mesh.apply("# nothing\n").unwrap_err()),
            ("InvalidArgument", "no documents to apply".into())
        );
        assert_eq!(mesh.apply(ALLOW).unwrap().len(), 1);
    }

    #[test]
    fn delete_is_all_or_nothing() {
        let mesh = TestMesh::new();
        mesh.apply(ALLOW).unwrap();
        let err = mesh.delete(&[key("shop", "allow"), key("shop", "missing")]).unwrap_err();
        let missing = resource_store_key("AuthorizationPolicy", "shop", "missing");
        assert_eq!(refusal(&err), ("NotFound", format!("not found: {missing}")));
        assert_eq!(mesh.current().resources.len(), 1, "the existing resource was deleted");

        // Control: deleting what exists succeeds.
        mesh.delete(&[key("shop", "allow")]).unwrap();
        assert!(mesh.current().resources.is_empty());
    }

    #[test]
    fn dry_run_stores_nothing() {
        let mesh = TestMesh::new();
        let (results, _) = mesh.apply_dry_run(ALLOW, trellis_policy::DEFAULT_ROOT_NAMESPACE).unwrap();
        assert_eq!(results[0].outcome, "created (dry run)");
        assert!(mesh.current().resources.is_empty());
        assert_eq!(
            refusal(&mesh.apply_dry_run(BAD, trellis_policy::DEFAULT_ROOT_NAMESPACE).unwrap_err()).0,
            "InvalidArgument"
        );
    }
}
