//! `trellis-bench scoping [--namespaces N] [--workloads W] [--rounds R] [--no-build]`: bytes pushed per proxy per
//! change, with and without scoped pushes, through a real control plane.
//!
//! A mesh of W workloads in N namespaces: per namespace one *scoped* simulated proxy (its Hello names its root
//! namespace, so the control plane sends it only its namespace's and the root namespace's resources) declaring
//! W/N of the workloads, and one *unscoped* proxy (a Hello without a root namespace: every resource, as before
//! scoping). Each round applies a namespace-local policy (in a different namespace each time) and counts the bytes
//! of the `ConfigUpdate`s every proxy receives until each has reached the new version (a proxy whose view did not
//! change receives a version-only update). Prints bytes per proxy for both kinds and their ratio; writes nothing.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use prost::Message;
use tokio::sync::{Semaphore, mpsc};
use trellis_proto::v1 as pb;
use trellis_proto::v1::discovery_request::Message as Up;
use trellis_proto::v1::discovery_response::Message as Down;
use trellis_tests::ControlPlane;
use trellis_tests::client;

const USAGE: &str = "trellis-bench scoping [--namespaces N] [--workloads W] [--rounds R] [--replicas N] [--no-build]";

struct Plan {
    namespaces: usize,
    workloads: usize,
    rounds: usize,
    /// 0: one control plane on redb; N: N replicas on a 3-member etcd cluster, proxy i on replica i mod N.
    replicas: usize,
}

pub fn main(argv: &[String]) -> ExitCode {
    let mut plan = Plan { namespaces: 100, workloads: 10_000, rounds: 3, replicas: 0 };
    let mut build = true;
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        let mut number = |slot: &mut usize| match args.next().and_then(|n| n.parse().ok()) {
            Some(n) if n > 0 => {
                *slot = n;
                true
            }
            _ => false,
        };
        let ok = match arg.as_str() {
            "--namespaces" => number(&mut plan.namespaces),
            "--workloads" => number(&mut plan.workloads),
            "--rounds" => number(&mut plan.rounds),
            "--replicas" => number(&mut plan.replicas),
            "--no-build" => {
                build = false;
                true
            }
            _ => false,
        };
        if !ok {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    if let Err(e) = crate::common::prepare(!build, |line| eprintln!("{line}")) {
        eprintln!("trellis-bench scoping: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    match runtime.block_on(run(&plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench scoping: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What a simulated proxy reports: (proxy index, scoped, version received, bytes of that update).
type Received = (usize, bool, u64, usize);

async fn run(plan: &Plan) -> anyhow::Result<()> {
    // Declared first, dropped last: the replicas stop before their etcd.
    let etcd = (plan.replicas > 0).then(|| trellis_tests::etcd::EtcdCluster::start(3));
    let replicas = match &etcd {
        Some(etcd) => ControlPlane::start_replicas(etcd, plan.replicas, &[]),
        None => vec![ControlPlane::start(&[])],
    };
    let cp = &replicas[0];
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.to_string()).collect();
    let per_namespace = plan.workloads / plan.namespaces;
    let namespace = |n: usize| format!("ns-{n:03}");
    eprintln!(
        "scoping: {} workloads in {} namespaces, {} scoped and {} unscoped proxies",
        per_namespace * plan.namespaces,
        plan.namespaces,
        plan.namespaces,
        plan.namespaces
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<Received>();
    let gate = Arc::new(Semaphore::new(16));
    let mut proxies = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..2 * plan.namespaces {
        let (n, scoped) = (i / 2, i % 2 == 0);
        let node = format!("scope-{i:04}");
        let ns = namespace(n);
        let (token, pin) = tokio::task::block_in_place(|| cp.token(&node, &[&ns], &[]));
        let (addr, gate, tx) = (addrs[i % addrs.len()].clone(), gate.clone(), tx.clone());
        proxies.spawn(async move {
            let permit = gate.acquire_owned().await?;
            let joined = client::join(&addr, &pin, &token, &node).await?.map_err(|s| anyhow!("join: {s}"))?;
            let workloads = if scoped {
                (0..per_namespace)
                    .map(|w| {
                        let address = format!("10.{}.{}.{}", 100 + n / 250, n % 250, 1 + w);
                        client::workload(&format!("w{w}"), &ns, "sa", &address)
                    })
                    .collect()
            } else {
                vec![]
            };
            let mut hello = client::hello(workloads);
            if scoped {
                hello.root_namespace = "trellis-system".into();
            }
            let mut stream = joined.discover(hello).await?.map_err(|s| anyhow!("discovery: {s}"))?;
            drop(permit);
            while let Some(message) = stream.rx.message().await? {
                if let Some(Down::Update(update)) = message.message {
                    let _ = tx.send((i, scoped, update.version, update.encoded_len()));
                    stream.send(Up::Ack(pb::Ack { version: update.version, ..Default::default() })).await;
                }
            }
            anyhow::Ok(())
        });
    }
    drop(tx);
    // Settle: every proxy at the same version, nothing arriving for a while.
    let mut versions = vec![0u64; 2 * plan.namespaces];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
            Ok(Some((i, _, version, _))) => versions[i] = versions[i].max(version),
            Ok(None) => bail!("every simulated proxy stopped"),
            Err(_) if versions.iter().all(|v| *v > 0 && *v == versions[0]) => break,
            Err(_) if started.elapsed() > Duration::from_secs(900) => bail!("the mesh did not settle: {versions:?}"),
            Err(_) => {}
        }
    }
    eprintln!("scoping: mesh up at version {} in {:.1}s", versions[0], started.elapsed().as_secs_f64());

    let mut ratios = Vec::new();
    for round in 0..plan.rounds {
        let n = (round * 37 + 7) % plan.namespaces;
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: scoped-change-{round}\n  \
             namespace: {ns}\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/{ns}/sa/sa\"]\n",
            ns = namespace(n)
        );
        let before = versions[0];
        let out = tokio::task::block_in_place(|| cp.ctl_stdin(&["apply", "-f", "-"], Some(&yaml)));
        if !out.status.success() {
            bail!("trellisctl apply failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut bytes = vec![0usize; 2 * plan.namespaces];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while versions.iter().any(|v| *v <= before) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((i, _, version, len))) => {
                    versions[i] = versions[i].max(version);
                    bytes[i] += len;
                }
                Ok(None) => bail!("every simulated proxy stopped"),
                Err(_) => bail!("round {round}: not every proxy reached the new version"),
            }
        }
        let sum = |scoped: bool| -> (usize, usize) {
            let picked: Vec<usize> = (0..bytes.len()).filter(|i| (i % 2 == 0) == scoped).map(|i| bytes[i]).collect();
            (picked.iter().sum(), picked.len())
        };
        let ((scoped_total, scoped_count), (unscoped_total, unscoped_count)) = (sum(true), sum(false));
        let scoped_each = scoped_total as f64 / scoped_count as f64;
        let unscoped_each = unscoped_total as f64 / unscoped_count as f64;
        let touched = bytes[2 * n];
        eprintln!(
            "round {round} (policy in {}): bytes per proxy: unscoped {unscoped_each:.1}, scoped {scoped_each:.1} \
             (the namespace's own proxy {touched}, others {}); {:.1}x fewer",
            namespace(n),
            bytes.iter().enumerate().filter(|(i, _)| i % 2 == 0 && *i != 2 * n).map(|(_, b)| *b).max().unwrap_or(0),
            unscoped_each / scoped_each
        );
        ratios.push(unscoped_each / scoped_each);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "scoped pushes, {} workloads in {} namespaces, namespace-local change: median {:.1}x fewer bytes per proxy",
        per_namespace * plan.namespaces,
        plan.namespaces,
        ratios[ratios.len() / 2]
    );
    proxies.abort_all();
    Ok(())
}
