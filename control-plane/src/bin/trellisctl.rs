//! `trellisctl`: apply and inspect Istio security resources, manage join tokens and nodes, see proxy status.

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use trellis_control_plane::cli::{self, status_line, table, timestamp};
use trellis_control_plane::parse_duration;
use trellis_control_plane::settings::CliConfig;
use trellis_proto::v1 as pb;
use trellis_proto::v1::admin_client::AdminClient;

#[derive(Parser)]
#[command(name = "trellisctl", version, about = "Operate a Trellis mesh")]
struct Cli {
    /// Config file (default: $TRELLIS_CONFIG, else ~/.trellis/config.yaml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Control-plane endpoint (host:port) to call instead of the config's; repeat it (or separate with commas) to
    /// list several replicas, tried in order until one accepts the connection.
    #[arg(long = "endpoint", global = true, value_delimiter = ',')]
    endpoints: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update resources from a file (or - for stdin); all documents or none.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Validate and show which workloads' effective policies would change; store nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete the resources named in a file, or one by kind and name.
    Delete {
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        file: Option<String>,
        kind: Option<String>,
        name: Option<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Show resources.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Nodes that joined (and `nodes revoke NAME`).
    Nodes {
        #[command(subcommand)]
        command: Option<NodesCommand>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Per proxy: connection, versions sent, ACKed and NACKed.
    ProxyStatus {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Ask a proxy to renew its certificates now.
    Renew {
        #[arg(long)]
        node: String,
        /// Only these identities (default: all of the node's).
        #[arg(long = "spiffe-id")]
        spiffe_ids: Vec<String>,
    },
    /// Revoke one workload identity mesh-wide: every proxy closes its connections and refuses its certificates,
    /// and the control plane signs no new one. Without --spiffe-id: list what is revoked.
    Revoke {
        #[arg(long = "spiffe-id")]
        spiffe_id: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Admin credentials: create, revoke, list.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Authorization tools that run locally, with the same code as the proxies.
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// Print the CLI version.
    Version,
    /// The mesh CA: rotate its root, see the rotation's status, renew this config's admin credential.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Rotate the root CA (or resume the rotation in progress) and follow it to the end: prepare (the new root
    /// joins the trust bundle, every connected proxy ACKs), switch (the new CA signs, every proxy renews), overlap,
    /// retire (the old root leaves the bundle). The control plane drives it; interrupted, run the command again.
    Rotate {
        /// Operator CA certificate (PEM) to rotate to (e.g. a new intermediate); default: a new root is generated.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// Private key of --ca-cert (PEM).
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Certificates above --ca-cert, up to and including the root (PEM).
        #[arg(long, requires = "ca_cert")]
        ca_chain: Option<PathBuf>,
        /// How long the old root stays trusted after the switch (default: until the last certificate the old CA
        /// issued to a proxy expires).
        #[arg(long, value_parser = parse_duration)]
        overlap: Option<Duration>,
        /// Retire the old root as soon as the switch is complete (also ends the overlap of a rotation under way).
        #[arg(long)]
        force: bool,
        /// Start (or resume) the rotation and return without following it.
        #[arg(long)]
        detach: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Roots, the rotation's phase, and which proxies still hold certificates of the retiring CA.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Renew this config's admin credential (a new key) under the CA that signs now, and refresh its CA bundle:
    /// for copies of an admin config, during a rotation's overlap.
    RenewCredential,
}

#[derive(Subcommand)]
enum AuthzCommand {
    /// Decide a request offline against policy files (AuthorizationPolicy, PeerAuthentication and
    /// RequestAuthentication documents; tokens in the request's headers are verified as the proxy does);
    /// prints {"decision", "status", "policy", "action", "rule", "reason"[, "requestPrincipal"]}. Invalid input
    /// exits 2.
    Eval {
        /// Policy file (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// The request, as JSON (see README).
        #[arg(long)]
        request: String,
        #[arg(long, default_value = trellis_policy::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token for one node.
    Create {
        #[arg(long)]
        node: String,
        /// Namespace the node may host workloads in (repeatable; default: default).
        #[arg(long = "namespace", short = 'n')]
        namespaces: Vec<String>,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Allow several joins with the same token.
        #[arg(long)]
        reusable: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Issue a credential for a new admin NAME and write a ready trellisctl config for it (mode 0600; the key is
    /// generated here and never sent).
    Create {
        name: String,
        /// Where to write the config (default: ./admin-NAME.yaml); never overwritten.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
        #[arg(long, default_value = "8760h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Revoke an admin: its calls are refused from now on, on connections already open too.
    Revoke { name: String },
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    /// Revoke a node: its credential stops working and its workloads leave the mesh.
    Revoke { name: String },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Authz { command: AuthzCommand::Eval { files, request, root_namespace } } = &cli.command {
        return match authz_eval(files, request, root_namespace) {
            Ok(json) => {
                println!("{json}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let message = match e.downcast_ref::<tonic::Status>() {
                Some(status) => status_line(status),
                None => format!("{e:#}"),
            };
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn read_input(file: &str) -> anyhow::Result<String> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(text);
    }
    std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
}

fn key_line(key: &Option<pb::ResourceKey>) -> String {
    key.as_ref().map(|k| format!("{}/{}/{}", k.kind, k.namespace, k.name)).unwrap_or_default()
}

fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("json"));
}

/// Offline evaluation: no control plane involved.
fn authz_eval(files: &[String], request: &str, root_namespace: &str) -> anyhow::Result<String> {
    let mut resources = Vec::new();
    for file in files {
        let text = read_input(file)?;
        resources.extend(trellis_policy::parse_documents(&text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?);
    }
    let request_text = read_input(request)?;
    let mut request =
        trellis_policy::EvalRequest::from_json(&request_text).map_err(|e| anyhow::anyhow!("{request}: {e}"))?;
    // Tokens' exp/nbf are checked against now unless the request says when.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    request.time.get_or_insert(now);
    let explanation = trellis_policy::explain(&resources, root_namespace, &request)?;
    Ok(explanation.to_json())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Version = cli.command {
        println!("trellisctl {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if let Command::Ca { command } = cli.command {
        let path = CliConfig::resolve_path(cli.config)?;
        return match command {
            CaCommand::Rotate { ca_cert, ca_key, ca_chain, overlap, force, detach, output } => {
                let args = trellis_control_plane::ca_cli::RotateArgs {
                    ca_cert,
                    ca_key,
                    ca_chain,
                    overlap,
                    force,
                    detach,
                    json: output == Output::Json,
                };
                trellis_control_plane::ca_cli::rotate(&path, args).await
            }
            CaCommand::Status { output } => trellis_control_plane::ca_cli::status(&path, output == Output::Json).await,
            CaCommand::RenewCredential => trellis_control_plane::ca_cli::renew(&path).await,
        };
    }
    let config = CliConfig::load(&CliConfig::resolve_path(cli.config)?)?.with_endpoints(cli.endpoints.clone());
    let mut admin = AdminClient::new(cli::connect(&config).await?);
    match cli.command {
        Command::Version | Command::Authz { .. } | Command::Ca { .. } => unreachable!("handled above"),
        Command::Apply { file, dry_run, output } => {
            let documents = read_input(&file)?;
            let response = admin.apply(pb::ApplyRequest { documents, dry_run }).await?.into_inner();
            if output == Output::Json {
                let items: Vec<_> = response
                    .results
                    .iter()
                    .map(|r| json!({"resource": key_line(&r.key), "revision": r.revision, "outcome": r.outcome}))
                    .collect();
                let changes: Vec<_> = response
                    .changes
                    .iter()
                    .map(|c| json!({"workload": c.workload, "changed": c.before != c.after, "before": c.before, "after": c.after}))
                    .collect();
                if dry_run {
                    print_json(&json!({"results": items, "changes": changes}));
                } else {
                    print_json(&json!(items));
                }
            } else {
                for r in &response.results {
                    println!("{} {}", key_line(&r.key), r.outcome);
                }
                if dry_run {
                    for c in &response.changes {
                        if c.before == c.after {
                            println!("workload {}: unchanged", c.workload);
                        } else {
                            println!(
                                "workload {}: changed: [{}] -> [{}]",
                                c.workload,
                                c.before.join(", "),
                                c.after.join(", ")
                            );
                        }
                    }
                }
            }
        }
        Command::Delete { file, kind, name, namespace } => {
            let request = match (file, kind, name) {
                (Some(file), None, None) => pb::DeleteRequest { documents: read_input(&file)?, keys: vec![] },
                (None, Some(kind), Some(name)) => pb::DeleteRequest {
                    documents: String::new(),
                    keys: vec![pb::ResourceKey { kind, namespace, name }],
                },
                _ => bail!("give either -f FILE or KIND NAME"),
            };
            for key in admin.delete(request).await?.into_inner().deleted {
                println!("{}/{}/{} deleted", key.kind, key.namespace, key.name);
            }
        }
        Command::Get { kind, name, namespace, all_namespaces, output } => {
            let single = name.is_some();
            let resources = match name {
                Some(name) => {
                    let key = pb::ResourceKey { kind, namespace, name };
                    vec![admin.get(pb::GetRequest { key: Some(key) }).await?.into_inner()]
                }
                None => {
                    let namespace = if all_namespaces { String::new() } else { namespace };
                    admin.list(pb::ListRequest { kind, namespace }).await?.into_inner().resources
                }
            };
            print_resources(&resources, single, output)?;
        }
        Command::Token { command } => token(&mut admin, command).await?,
        Command::Nodes { command: Some(NodesCommand::Revoke { name }), .. } => {
            admin.revoke_node(pb::RevokeNodeRequest { name: name.clone() }).await?;
            println!("node {name} revoked");
        }
        Command::Nodes { command: None, output } => {
            let nodes = admin.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
            if output == Output::Json {
                let items: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        json!({"name": n.name, "namespaces": n.namespaces, "joinedAt": timestamp(n.joined_at_unix),
                        "revoked": n.revoked, "connected": n.connected, "workloads": n.workloads})
                    })
                    .collect();
                print_json(&json!(items));
            } else {
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.namespaces.join(","),
                            if n.revoked {
                                "revoked"
                            } else if n.connected {
                                "connected"
                            } else {
                                "disconnected"
                            }
                            .into(),
                            n.workloads.len().to_string(),
                            timestamp(n.joined_at_unix),
                        ]
                    })
                    .collect();
                print!("{}", table(&["NAME", "NAMESPACES", "STATE", "WORKLOADS", "JOINED"], &rows));
            }
        }
        Command::ProxyStatus { output } => {
            let status = admin.proxy_status(pb::ProxyStatusRequest {}).await?.into_inner();
            if output == Output::Json {
                let items: Vec<_> = status
                    .proxies
                    .iter()
                    .map(|p| json!({"node": p.node, "connected": p.connected, "connectedSince": timestamp(p.connected_since_unix),
                        "sentVersion": p.sent_version, "ackedVersion": p.acked_version, "nackedVersion": p.nacked_version,
                        "lastNackError": p.last_nack_error, "proxyVersion": p.proxy_version, "replica": p.replica,
                        "lastConvergenceSeconds": (p.last_convergence_seconds > 0.0).then_some(p.last_convergence_seconds),
                        "synced": p.connected && p.acked_version == status.current_version}))
                    .collect();
                print_json(&json!({"currentVersion": status.current_version, "proxies": items}));
            } else {
                let rows: Vec<Vec<String>> = status
                    .proxies
                    .iter()
                    .map(|p| {
                        let state = if !p.connected {
                            "DISCONNECTED"
                        } else if p.acked_version == status.current_version {
                            "SYNCED"
                        } else if p.nacked_version > p.acked_version {
                            "NACKED"
                        } else {
                            "STALE"
                        };
                        vec![
                            p.node.clone(),
                            if p.replica.is_empty() { "-".into() } else { p.replica.clone() },
                            state.into(),
                            p.sent_version.to_string(),
                            p.acked_version.to_string(),
                            if p.last_convergence_seconds > 0.0 {
                                format!("{:.1}ms", p.last_convergence_seconds * 1000.0)
                            } else {
                                "-".into()
                            },
                            if p.last_nack_error.is_empty() {
                                "-".into()
                            } else {
                                format!("v{}: {}", p.nacked_version, p.last_nack_error)
                            },
                            timestamp(p.connected_since_unix),
                        ]
                    })
                    .collect();
                println!("current version: {}", status.current_version);
                print!(
                    "{}",
                    table(
                        &["NODE", "REPLICA", "STATE", "SENT", "ACKED", "CONVERGENCE", "LAST NACK", "CONNECTED SINCE"],
                        &rows
                    )
                );
            }
        }
        Command::Revoke { spiffe_id: Some(spiffe_id), .. } => {
            admin.revoke_identity(pb::RevokeIdentityRequest { spiffe_id: spiffe_id.clone() }).await?;
            println!("identity {spiffe_id} revoked");
        }
        Command::Revoke { spiffe_id: None, output } => {
            let list = admin.list_revocations(pb::ListRevocationsRequest {}).await?.into_inner();
            print_revocations(&list, output);
        }
        Command::Admin { command } => admins(&mut admin, &config, command).await?,
        Command::Renew { node, spiffe_ids } => {
            admin.renew_certificates(pb::RenewCertificatesRequest { node: node.clone(), spiffe_ids }).await?;
            println!("renewal requested from node {node}");
        }
    }
    Ok(())
}

async fn token(admin: &mut AdminClient<tonic::transport::Channel>, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { node, mut namespaces, ttl, reusable, output } => {
            if namespaces.is_empty() {
                namespaces.push("default".into());
            }
            let request = pb::CreateTokenRequest { node, namespaces, ttl_seconds: ttl.as_secs(), reusable };
            let created = admin.create_token(request).await?.into_inner();
            if output == Output::Json {
                print_json(&json!({"token": created.token, "id": created.id, "caPin": created.ca_pin,
                    "expiresAt": timestamp(created.expires_at_unix)}));
            } else {
                println!("token:   {}", created.token);
                println!("ca pin:  {}", created.ca_pin);
                println!("expires: {}", timestamp(created.expires_at_unix));
            }
        }
        TokenCommand::List { output } => {
            let tokens = admin.list_tokens(pb::ListTokensRequest {}).await?.into_inner().tokens;
            if output == Output::Json {
                let items: Vec<_> = tokens
                    .iter()
                    .map(|t| json!({"id": t.id, "node": t.node, "namespaces": t.namespaces,
                        "expiresAt": timestamp(t.expires_at_unix), "reusable": t.reusable, "uses": t.uses, "revoked": t.revoked}))
                    .collect();
                print_json(&json!(items));
            } else {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.node.clone(),
                            t.namespaces.join(","),
                            timestamp(t.expires_at_unix),
                            if t.reusable { "reusable" } else { "single-use" }.into(),
                            t.uses.to_string(),
                            if t.revoked { "revoked" } else { "-" }.into(),
                        ]
                    })
                    .collect();
                print!("{}", table(&["ID", "NODE", "NAMESPACES", "EXPIRES", "KIND", "USES", "REVOKED"], &rows));
            }
        }
        TokenCommand::Revoke { id } => {
            admin.revoke_token(pb::RevokeTokenRequest { id: id.clone() }).await?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

fn print_revocations(list: &pb::Revocations, output: Output) {
    if output == Output::Json {
        let certificates: Vec<_> = list
            .certificates
            .iter()
            .map(|c| json!({"serial": c.serial, "node": c.node, "spiffeId": c.spiffe_id, "notAfter": timestamp(c.not_after_unix)}))
            .collect();
        let identities: Vec<_> = list
            .identities
            .iter()
            .map(|i| json!({"spiffeId": i.spiffe_id, "revokedAt": timestamp(i.revoked_at_unix)}))
            .collect();
        let nodes: Vec<_> = list
            .nodes
            .iter()
            .map(|n| json!({"node": n.node, "serialTag": n.serial_tag, "revokedAt": timestamp(n.revoked_at_unix)}))
            .collect();
        print_json(&json!({"certificates": certificates, "identities": identities, "nodes": nodes}));
        return;
    }
    let mut rows: Vec<Vec<String>> = list
        .identities
        .iter()
        .map(|i| vec!["identity".into(), i.spiffe_id.clone(), "-".into(), timestamp(i.revoked_at_unix)])
        .collect();
    // A revoked node's workload certificates: every serial starting with its tag.
    rows.extend(list.nodes.iter().map(|n| {
        vec![format!("node {}", n.node), "-".into(), format!("{}*", n.serial_tag), timestamp(n.revoked_at_unix)]
    }));
    rows.extend(
        list.certificates.iter().map(|c| {
            vec![format!("node {}", c.node), c.spiffe_id.clone(), c.serial.clone(), timestamp(c.not_after_unix)]
        }),
    );
    print!("{}", table(&["REVOKED", "SPIFFE ID", "SERIAL", "SINCE/UNTIL"], &rows));
}

async fn admins(
    admin: &mut AdminClient<tonic::transport::Channel>,
    config: &CliConfig,
    command: AdminCommand,
) -> anyhow::Result<()> {
    match command {
        AdminCommand::Create { name, out, ttl } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("admin-{name}.yaml")));
            if out.exists() {
                bail!("{} already exists: refusing to overwrite it", out.display());
            }
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr_der = rcgen::CertificateParams::default().serialize_request(&key)?.der().to_vec();
            let request = pb::CreateAdminRequest { name: name.clone(), csr_der, ttl_seconds: ttl.as_secs() };
            let created = admin.create_admin(request).await?.into_inner();
            let pem = |der: &[u8]| trellis_control_plane::files::pem("CERTIFICATE", der);
            let new = CliConfig {
                endpoint: config.endpoint.clone(),
                endpoints: config.endpoints.clone(),
                ca_bundle: pem(&created.ca_root),
                certificate: created.certificate_chain.iter().map(|c| pem(c)).collect(),
                key: key.serialize_pem(),
            };
            trellis_control_plane::files::write_new(&out, serde_yaml_ng::to_string(&new)?.as_bytes(), 0o600)?;
            println!(
                "admin {name} created: config written to {} (expires {})",
                out.display(),
                timestamp(created.expires_at_unix)
            );
        }
        AdminCommand::Revoke { name } => {
            admin.revoke_admin(pb::RevokeAdminRequest { name: name.clone() }).await?;
            println!("admin {name} revoked");
        }
        AdminCommand::List { output } => {
            let admins = admin.list_admins(pb::ListAdminsRequest {}).await?.into_inner().admins;
            if output == Output::Json {
                let items: Vec<_> = admins
                    .iter()
                    .map(|a| {
                        json!({"name": a.name, "createdAt": timestamp(a.created_at_unix), "createdBy": a.created_by,
                        "revoked": a.revoked, "revokedAt": a.revoked.then(|| timestamp(a.revoked_at_unix)),
                        "serial": a.serial, "expiresAt": timestamp(a.expires_at_unix)})
                    })
                    .collect();
                print_json(&json!(items));
            } else {
                let rows: Vec<Vec<String>> = admins
                    .iter()
                    .map(|a| {
                        vec![
                            a.name.clone(),
                            if a.revoked {
                                format!("revoked {}", timestamp(a.revoked_at_unix))
                            } else {
                                "active".into()
                            },
                            if a.created_by.is_empty() { "(init)".into() } else { a.created_by.clone() },
                            timestamp(a.created_at_unix),
                            timestamp(a.expires_at_unix),
                        ]
                    })
                    .collect();
                print!("{}", table(&["NAME", "STATE", "CREATED BY", "CREATED", "EXPIRES"], &rows));
            }
        }
    }
    Ok(())
}

/// One named resource prints as itself; a listing as `{"items": [...]}` (JSON) or `---`-separated documents.
fn print_resources(resources: &[pb::Resource], single: bool, output: Output) -> anyhow::Result<()> {
    let docs: Vec<serde_json::Value> =
        resources.iter().map(|r| serde_json::from_str(&r.json)).collect::<Result<_, _>>()?;
    match output {
        Output::Json if single => print_json(&docs[0]),
        Output::Json => print_json(&json!({"items": docs})),
        Output::Yaml => {
            let texts: Vec<String> = docs.iter().map(serde_yaml_ng::to_string).collect::<Result<_, _>>()?;
            print!("{}", texts.join("---\n"));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = resources
                .iter()
                .zip(&docs)
                .map(|(r, doc)| {
                    let key = r.key.clone().unwrap_or_default();
                    let detail = match key.kind.as_str() {
                        "AuthorizationPolicy" => doc["spec"]["action"].as_str().unwrap_or("ALLOW").to_owned(),
                        "PeerAuthentication" => doc["spec"]["mtls"]["mode"].as_str().unwrap_or("UNSET").to_owned(),
                        _ => "-".to_owned(),
                    };
                    vec![key.namespace, key.name, key.kind, detail, r.revision.to_string()]
                })
                .collect();
            print!("{}", table(&["NAMESPACE", "NAME", "KIND", "ACTION/MODE", "REVISION"], &rows));
        }
    }
    Ok(())
}
