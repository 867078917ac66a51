//! The proxy's Prometheus metrics, served on `listen.metrics` (15020).
//!
//! Traffic series carry Istio's names and labels, so Istio's dashboards and alerts work unchanged. Labels come only
//! from verified identities and registered workloads, never from what a client sends, so the number of series is
//! bounded by the mesh's size. A series' handles are looked up once per connection from a map filled on first use;
//! an upkeep every [`UPKEEP_INTERVAL`] touches the series of workloads still in the mesh and forgets the others,
//! and the exporter drops every series left untouched for [`SERIES_IDLE_TIMEOUT`]: that is how the series of a
//! workload that left the mesh disappear.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use metrics::{Counter, Gauge, Label};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use trellis_policy::{Action, Decision, PolicyRef, WorkloadPolicies};
use trellis_proto::spiffe::SpiffeId;

pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(30);
pub const SERIES_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Istio's buckets for its HTTP histograms (Envoy's defaults, which Istio's stats filter keeps for
/// `istio_request_duration_milliseconds`, `istio_request_bytes` and `istio_response_bytes` alike).
const ISTIO_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Installs the process-wide recorder (histograms as real buckets, idle series expiring) and describes every
/// series. Returns the handle that renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = builder(SERIES_IDLE_TIMEOUT)?.install_recorder()?;
    describe();
    Ok(handle)
}

fn builder(idle_timeout: Duration) -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::ALL, Some(idle_timeout))
        .set_buckets_for_metric(Matcher::Full("istio_request_duration_milliseconds".into()), &ISTIO_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("istio_request_bytes".into()), &ISTIO_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("istio_response_bytes".into()), &ISTIO_BUCKETS))
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("istio_tcp_connections_opened_total", "TCP connections opened (Istio standard metric).");
    describe_counter!("istio_tcp_connections_closed_total", "TCP connections closed (Istio standard metric).");
    describe_counter!(
        "istio_tcp_received_bytes_total",
        Unit::Bytes,
        "Bytes from the source to the destination (Istio standard metric)."
    );
    describe_counter!(
        "istio_tcp_sent_bytes_total",
        Unit::Bytes,
        "Bytes from the destination to the source (Istio standard metric)."
    );
    describe_counter!("istio_requests_total", "HTTP requests (Istio standard metric).");
    describe_histogram!(
        "istio_request_duration_milliseconds",
        Unit::Milliseconds,
        "HTTP request duration, to the last byte of the response (Istio standard metric)."
    );
    describe_histogram!(
        "istio_request_bytes",
        Unit::Bytes,
        "HTTP request size: header names and values, body and trailers (Istio standard metric)."
    );
    describe_histogram!(
        "istio_response_bytes",
        Unit::Bytes,
        "HTTP response size: header names and values, body and trailers (Istio standard metric)."
    );
    describe_counter!(
        "trellis_authz_decisions_total",
        "Authorization outcomes by deciding policy: allowed, denied, audited, dry_run_would_deny, closed_on_reevaluation."
    );
    describe_gauge!("trellis_open_connections", "Proxied connections open now, by direction.");
    describe_gauge!(
        "trellis_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When each workload certificate expires (Unix time)."
    );
    describe_counter!("trellis_certificate_rotations_total", "Workload certificate issuance attempts, by result.");
    describe_counter!(
        "trellis_workload_api_svids_issued_total",
        "X.509-SVIDs issued for applications (Workload API), each with its own key, by SPIFFE ID."
    );
    describe_counter!(
        "trellis_workload_api_jwt_svids_issued_total",
        "JWT-SVIDs (signed by the control plane) handed to Workload API callers, by SPIFFE ID."
    );
    describe_counter!(
        "trellis_svid_files_written_total",
        "Times a workload's SVID files (svidFiles: svid.pem, svid_key.pem, bundle.pem) were written, by SPIFFE ID."
    );
    describe_counter!(
        "trellis_workload_api_calls_total",
        "Workload API calls, by method and result (ok, permission_denied, invalid_argument, unavailable, unimplemented)."
    );
    describe_gauge!("trellis_trust_bundle_roots", "Root certificates in the trust bundle.");
    describe_gauge!(
        "trellis_trust_bundle_root_expiry_timestamp_seconds",
        Unit::Seconds,
        "When each trust-bundle root expires (Unix time), by SHA-256 fingerprint."
    );
    describe_gauge!("trellis_config_version", "The config version applied.");
    describe_counter!("trellis_config_updates_total", "Config updates received, by result (ack, nack).");
    describe_gauge!("trellis_control_plane_connected", "1 while the discovery stream is open.");
    describe_gauge!(
        "trellis_control_plane_replica",
        "1 for the control-plane replica (address from controlPlane.addresses) whose discovery stream is open, 0 for \
         the others."
    );
    describe_counter!(
        "trellis_log_suppressed_total",
        "Log lines dropped by a rate limit (refused HBONE connections, accept errors beyond the burst), by log and reason."
    );
    describe_counter!(
        "trellis_connections_shed_total",
        "Connections closed as soon as accepted because the proxy was out of file descriptors, by listener."
    );
    describe_counter!(
        "trellis_connections_timed_out_total",
        "Proxied connections the proxy closed because they carried nothing, by reason (idle: no byte either way for \
         connection.idleTimeout; write_stall: a peer took no byte for connection.writeStallTimeout)."
    );
    describe_counter!(
        "trellis_revocations_total",
        "What revocations did, by kind (node, identity) and action (refused: a handshake; closed: an HBONE connection; stream_closed: a tunnel)."
    );
    describe_counter!(
        "trellis_certificate_renewals_total",
        "Certificates this proxy asked for and got or did not, by kind (node: its node credential; workload: an SVID) and outcome (renewed; refused: by the control plane; failed: an unusable answer or no answer)."
    );
    describe_gauge!("process_resident_memory_bytes", Unit::Bytes, "Resident memory.");
    describe_counter!("process_cpu_seconds_total", Unit::Seconds, "CPU time, user and system.");
    describe_gauge!("process_open_fds", "Open file descriptors.");
    describe_gauge!("process_start_time_seconds", Unit::Seconds, "Process start (Unix time).");
    describe_gauge!("tokio_workers", "Worker threads of the async runtime.");
    describe_gauge!("tokio_alive_tasks", "Tasks alive in the async runtime.");
    describe_gauge!("tokio_global_queue_depth", "Tasks waiting in the runtime's global queue.");
}

/// Who one end of a connection is, as metric labels. Built once per workload when the registry changes.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PeerLabels {
    pub principal: Arc<str>,
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
}

impl PeerLabels {
    pub fn new(id: &SpiffeId, workload: &str, namespace: &str) -> Arc<Self> {
        Arc::new(Self { principal: id.principal().into(), workload: workload.into(), namespace: namespace.into() })
    }

    /// A verified identity whose workload is not known (not in the registry, or its address does not match).
    pub fn identity_only(id: &SpiffeId) -> Arc<Self> {
        let namespace = match id.subject() {
            trellis_proto::spiffe::Subject::Workload { namespace, .. } => namespace,
            _ => "unknown",
        };
        Arc::new(Self { principal: id.principal().into(), workload: "unknown".into(), namespace: namespace.into() })
    }

    /// No identity: a plaintext peer, or a destination outside the mesh.
    pub fn unknown() -> Arc<Self> {
        static UNKNOWN: OnceLock<Arc<PeerLabels>> = OnceLock::new();
        UNKNOWN
            .get_or_init(|| {
                Arc::new(Self { principal: "unknown".into(), workload: "unknown".into(), namespace: "unknown".into() })
            })
            .clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Envoy-style response flags, as Istio reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flags {
    /// Nothing went wrong.
    None,
    /// Denied by authorization policy.
    Deny,
    /// The next hop could not be reached (workload, peer proxy or passthrough destination).
    Connect,
    /// The TLS handshake failed.
    TlsFailure,
    /// Refused before any hop: no route for it (e.g. passthrough denied, unknown target).
    NoRoute,
    /// The client's connection ended (a reset) before the proxy had a way on for it.
    DownstreamTerminated,
}

impl Flags {
    pub fn as_str(self) -> &'static str {
        match self {
            Flags::None => "-",
            Flags::Deny => "DENY",
            Flags::Connect => "CONNECT",
            Flags::TlsFailure => "TLS_FAILURE",
            Flags::NoRoute => "NR",
            Flags::DownstreamTerminated => "DC",
        }
    }
}

/// The label values of one traffic series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrafficKey {
    pub reporter: Reporter,
    pub source: Arc<PeerLabels>,
    pub destination: Arc<PeerLabels>,
    pub mutual_tls: bool,
    pub flags: Flags,
}

impl TrafficKey {
    fn labels(&self) -> Vec<Label> {
        vec![
            Label::new("reporter", self.reporter.as_str()),
            Label::new("source_principal", self.source.principal.clone()),
            Label::new("source_workload", self.source.workload.clone()),
            Label::new("source_workload_namespace", self.source.namespace.clone()),
            Label::new("destination_principal", self.destination.principal.clone()),
            Label::new("destination_workload", self.destination.workload.clone()),
            Label::new("destination_workload_namespace", self.destination.namespace.clone()),
            Label::new("connection_security_policy", if self.mutual_tls { "mutual_tls" } else { "none" }),
            Label::new("response_flags", self.flags.as_str()),
        ]
    }
}

/// Istio's four TCP series for one label set.
pub struct TcpSeries {
    opened: Counter,
    closed: Counter,
    received: Counter,
    sent: Counter,
}

impl TcpSeries {
    fn register(key: &TrafficKey) -> Self {
        let labels = key.labels();
        Self {
            opened: metrics::counter!("istio_tcp_connections_opened_total", labels.clone()),
            closed: metrics::counter!("istio_tcp_connections_closed_total", labels.clone()),
            received: metrics::counter!("istio_tcp_received_bytes_total", labels.clone()),
            sent: metrics::counter!("istio_tcp_sent_bytes_total", labels),
        }
    }

    fn touch(&self) {
        for c in [&self.opened, &self.closed, &self.received, &self.sent] {
            c.increment(0);
        }
    }

    pub fn opened(&self) {
        self.opened.increment(1);
    }

    /// `received`: bytes from the source; `sent`: bytes to it.
    pub fn closed(&self, received: u64, sent: u64) {
        self.received.increment(received);
        self.sent.increment(sent);
        self.closed.increment(1);
    }
}

/// Istio's HTTP series for one label set plus the response code.
pub struct HttpSeries {
    requests: Counter,
    duration_ms: metrics::Histogram,
    request_bytes: metrics::Histogram,
    response_bytes: metrics::Histogram,
}

impl HttpSeries {
    /// One request: its duration (to the last byte of the response) and both messages' total sizes.
    pub fn record(&self, duration: Duration, request_bytes: u64, response_bytes: u64) {
        self.requests.increment(1);
        self.duration_ms.record(duration.as_secs_f64() * 1000.0);
        self.request_bytes.record(request_bytes as f64);
        self.response_bytes.record(response_bytes as f64);
    }
}

/// Traffic series by label set, created on first use.
#[derive(Default)]
pub struct TrafficMetrics {
    tcp: DashMap<TrafficKey, Arc<TcpSeries>>,
    http: DashMap<(TrafficKey, u16), Arc<HttpSeries>>,
    open: OnceLock<[Gauge; 2]>,
}

impl TrafficMetrics {
    pub fn tcp(&self, key: TrafficKey) -> Arc<TcpSeries> {
        if let Some(series) = self.tcp.get(&key) {
            return series.clone();
        }
        let series = Arc::new(TcpSeries::register(&key));
        self.tcp.entry(key).or_insert(series).clone()
    }

    /// The request series for `key` and an HTTP status code (a bounded set: 100..=599).
    pub fn http(&self, key: TrafficKey, status: u16) -> Arc<HttpSeries> {
        let key = (key, status);
        if let Some(series) = self.http.get(&key) {
            return series.clone();
        }
        let mut labels = key.0.labels();
        labels.push(Label::new("response_code", status.to_string()));
        labels.push(Label::new("request_protocol", "http"));
        let series = Arc::new(HttpSeries {
            requests: metrics::counter!("istio_requests_total", labels.clone()),
            duration_ms: metrics::histogram!("istio_request_duration_milliseconds", labels.clone()),
            request_bytes: metrics::histogram!("istio_request_bytes", labels.clone()),
            response_bytes: metrics::histogram!("istio_response_bytes", labels),
        });
        self.http.entry(key).or_insert(series).clone()
    }

    fn open_gauges(&self) -> &[Gauge; 2] {
        self.open.get_or_init(|| {
            [
                metrics::gauge!("trellis_open_connections", "direction" => "inbound"),
                metrics::gauge!("trellis_open_connections", "direction" => "outbound"),
            ]
        })
    }

    /// Counts an open connection until the returned guard drops.
    pub fn open_connection(&self, reporter: Reporter) -> OpenGuard {
        let gauge = self.open_gauges()[match reporter {
            Reporter::Destination => 0,
            Reporter::Source => 1,
        }]
        .clone();
        gauge.increment(1.0);
        OpenGuard(gauge)
    }

    /// Keeps the series whose workloads are still in the mesh (`present`: `(namespace, workload)`), forgets the
    /// others so the exporter expires them.
    pub fn upkeep(&self, present: &HashSet<(Arc<str>, Arc<str>)>) {
        let known =
            |p: &PeerLabels| &*p.workload == "unknown" || present.contains(&(p.namespace.clone(), p.workload.clone()));
        self.tcp.retain(|key, series| {
            let keep = known(&key.source) && known(&key.destination);
            if keep {
                series.touch();
            }
            keep
        });
        // A histogram cannot be touched without recording: request series of live workloads that saw no request
        // for the idle timeout expire and come back with the next request.
        self.http.retain(|(key, _), _| known(&key.source) && known(&key.destination));
        for gauge in self.open_gauges() {
            gauge.increment(0.0);
        }
    }
}

pub struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The outcome labels of `trellis_authz_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allowed,
    Denied,
    Audited,
    DryRunWouldDeny,
    ClosedOnReevaluation,
}

impl Outcome {
    const ALL: [Outcome; 5] =
        [Outcome::Allowed, Outcome::Denied, Outcome::Audited, Outcome::DryRunWouldDeny, Outcome::ClosedOnReevaluation];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Audited => "audited",
            Outcome::DryRunWouldDeny => "dry_run_would_deny",
            Outcome::ClosedOnReevaluation => "closed_on_reevaluation",
        }
    }
}

/// One policy's decision counters, registered on first use so that unused policies add no series.
struct PolicyCounters {
    action: &'static str,
    policy: Arc<str>,
    by_outcome: [OnceLock<Counter>; 5],
}

impl PolicyCounters {
    fn new(action: &'static str, policy: Arc<str>) -> Self {
        Self { action, policy, by_outcome: Default::default() }
    }

    fn counter(&self, outcome: Outcome) -> &Counter {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).expect("every outcome is listed");
        self.by_outcome[index].get_or_init(|| {
            metrics::counter!(
                "trellis_authz_decisions_total",
                "action" => self.action,
                "policy" => self.policy.clone(),
                "result" => outcome.as_str()
            )
        })
    }

    fn touch(&self) {
        for counter in self.by_outcome.iter().filter_map(OnceLock::get) {
            counter.increment(0);
        }
    }
}

/// Decision counters for the policies that apply to this proxy's workloads, built once per config change;
/// recording a decision is two map lookups by borrowed name, no allocation.
#[derive(Default)]
pub struct DecisionCounters {
    /// namespace → name → counters.
    by_policy: HashMap<String, HashMap<String, PolicyCounters>>,
    /// Decisions no policy made (no ALLOW policy applies, or none matched).
    no_policy: OnceLock<PolicyCounters>,
}

impl DecisionCounters {
    pub fn build<'a>(workloads: impl IntoIterator<Item = &'a WorkloadPolicies>) -> Self {
        let mut by_policy: HashMap<String, HashMap<String, PolicyCounters>> = HashMap::new();
        for (namespace, name, action, _) in workloads.into_iter().flat_map(WorkloadPolicies::policies) {
            by_policy
                .entry(namespace.to_owned())
                .or_default()
                .entry(name.to_owned())
                .or_insert_with(|| PolicyCounters::new(action_label(action), policy_name(namespace, name)));
        }
        Self { by_policy, no_policy: OnceLock::new() }
    }

    /// Keeps the series of the policies that still apply from expiring.
    pub fn touch(&self) {
        for counters in self.by_policy.values().flat_map(HashMap::values) {
            counters.touch();
        }
        if let Some(counters) = self.no_policy.get() {
            counters.touch();
        }
    }

    /// The name (`ns/name`) of `policy`, built once per config change; `None` when no policy decided.
    pub fn name_of(&self, policy: Option<&PolicyRef<'_>>) -> Option<Arc<str>> {
        let policy = policy?;
        Some(match self.by_policy.get(policy.namespace).and_then(|names| names.get(policy.name)) {
            Some(counters) => counters.policy.clone(),
            // Every policy a decision can name is counted here; a name is built on the spot only if one is not.
            None => policy_name(policy.namespace, policy.name),
        })
    }

    fn counters(&self, policy: Option<&PolicyRef<'_>>) -> &PolicyCounters {
        match policy.and_then(|p| self.by_policy.get(p.namespace)?.get(p.name)) {
            Some(counters) => counters,
            None => self.no_policy.get_or_init(|| PolicyCounters::new("none", "none".into())),
        }
    }

    /// Counts a decision: its verdict under the deciding policy, each AUDIT match, and a dry-run denial.
    pub fn record(&self, decision: &Decision<'_>) {
        let outcome = if decision.allowed { Outcome::Allowed } else { Outcome::Denied };
        self.counters(decision.deciding.as_ref()).counter(outcome).increment(1);
        for audit in &decision.audit {
            self.counters(Some(audit)).counter(Outcome::Audited).increment(1);
        }
        if let Some(dry_run) = decision.dry_run.as_ref().filter(|d| !d.allowed) {
            self.counters(dry_run.deciding.as_ref()).counter(Outcome::DryRunWouldDeny).increment(1);
        }
    }

    /// Counts a connection closed because a new policy set denies it.
    pub fn record_closed(&self, decision: &Decision<'_>) {
        self.counters(decision.deciding.as_ref()).counter(Outcome::ClosedOnReevaluation).increment(1);
    }
}

/// How series and access logs name a policy (AuthorizationPolicy or PeerAuthentication): `namespace/name`.
pub fn policy_name(namespace: &str, name: &str) -> Arc<str> {
    format!("{namespace}/{name}").into()
}

fn action_label(action: Action) -> &'static str {
    match action {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Audit => "AUDIT",
        Action::Custom => "CUSTOM",
    }
}

/// Identity and config health: set from the current state at every upkeep (which also keeps them from expiring).
pub struct Health<'a> {
    pub certificates: Vec<(String, SystemTime)>,
    pub roots: Vec<(&'a str, SystemTime)>,
    pub config_version: Option<u64>,
}

pub fn record_health(health: &Health<'_>) {
    for (spiffe_id, not_after) in &health.certificates {
        metrics::gauge!("trellis_certificate_expiry_timestamp_seconds", "spiffe_id" => spiffe_id.clone())
            .set(unix_seconds(*not_after));
    }
    metrics::gauge!("trellis_trust_bundle_roots").set(health.roots.len() as f64);
    for (sha256, not_after) in &health.roots {
        metrics::gauge!("trellis_trust_bundle_root_expiry_timestamp_seconds", "sha256" => sha256.to_string())
            .set(unix_seconds(*not_after));
    }
    if let Some(version) = health.config_version {
        metrics::gauge!("trellis_config_version").set(version as f64);
    }
    metrics::gauge!("trellis_control_plane_connected").increment(0.0);
    for result in ["ack", "nack"] {
        metrics::counter!("trellis_config_updates_total", "result" => result).increment(0);
    }
    for kind in [RenewalKind::Node, RenewalKind::Workload] {
        for outcome in [RenewalOutcome::Renewed, RenewalOutcome::Refused, RenewalOutcome::Failed] {
            metrics::counter!("trellis_certificate_renewals_total", "kind" => kind.label(), "outcome" => outcome.label())
                .increment(0);
        }
    }
    for result in ["ok", "error"] {
        for (spiffe_id, _) in &health.certificates {
            metrics::counter!("trellis_certificate_rotations_total", "spiffe_id" => spiffe_id.clone(), "result" => result)
                .increment(0);
        }
    }
}

/// Counts a certificate issuance attempt for `spiffe_id` (bounded: this proxy's own identities).
pub fn certificate_rotation(spiffe_id: &SpiffeId, ok: bool) {
    metrics::counter!(
        "trellis_certificate_rotations_total",
        "spiffe_id" => spiffe_id.to_string(),
        "result" => if ok { "ok" } else { "error" }
    )
    .increment(1);
}

/// Which certificate a renewal was for: `kind` of `trellis_certificate_renewals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalKind {
    /// The proxy's node credential.
    Node,
    /// A workload SVID (tunnel or Workload API).
    Workload,
}

/// How a renewal ended: `outcome` of `trellis_certificate_renewals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalOutcome {
    Renewed,
    /// The control plane said no (a revoked node or identity, a CSR it does not sign).
    Refused,
    /// The answer was unusable, or none came in time.
    Failed,
}

impl RenewalKind {
    fn label(self) -> &'static str {
        match self {
            RenewalKind::Node => "node",
            RenewalKind::Workload => "workload",
        }
    }
}

impl RenewalOutcome {
    fn label(self) -> &'static str {
        match self {
            RenewalOutcome::Renewed => "renewed",
            RenewalOutcome::Refused => "refused",
            RenewalOutcome::Failed => "failed",
        }
    }
}

/// Counts one certificate obtained or not (bounded labels: two kinds, three outcomes).
pub fn certificate_renewal(kind: RenewalKind, outcome: RenewalOutcome) {
    metrics::counter!("trellis_certificate_renewals_total", "kind" => kind.label(), "outcome" => outcome.label())
        .increment(1);
}

/// An application SVID (Workload API) was issued.
/// A JWT-SVID was handed to a Workload API caller (labels: the configured workloads' identities).
pub fn workload_api_jwt_svid_issued(spiffe_id: &SpiffeId) {
    metrics::counter!("trellis_workload_api_jwt_svids_issued_total", "spiffe_id" => spiffe_id.to_string()).increment(1);
}

pub fn workload_api_svid_issued(spiffe_id: &SpiffeId) {
    metrics::counter!("trellis_workload_api_svids_issued_total", "spiffe_id" => spiffe_id.to_string()).increment(1);
}

/// A workload's SVID files were (re)written.
pub fn svid_files_written(spiffe_id: &SpiffeId) {
    metrics::counter!("trellis_svid_files_written_total", "spiffe_id" => spiffe_id.to_string()).increment(1);
}

/// A Workload API call was answered or refused.
pub fn workload_api_call(method: &'static str, result: &'static str) {
    metrics::counter!("trellis_workload_api_calls_total", "method" => method, "result" => result).increment(1);
}

pub fn config_update(applied: bool) {
    metrics::counter!("trellis_config_updates_total", "result" => if applied { "ack" } else { "nack" }).increment(1);
}

/// Counts a log line dropped by a rate limit (`log_limit.rs`); `reason` is one of a fixed set.
pub fn log_suppressed(log: &'static str, reason: &'static str) {
    metrics::counter!("trellis_log_suppressed_total", "log" => log, "reason" => reason).increment(1);
}

/// Counts a connection closed at accept because the process had no file descriptor left (`listen.rs`).
pub fn connection_shed(listener: &'static str) {
    metrics::counter!("trellis_connections_shed_total", "listener" => listener).increment(1);
}

/// Counts a proxied connection closed by one of its timeouts (`copy::Timeout::reason`).
pub fn connection_timed_out(reason: &'static str) {
    metrics::counter!("trellis_connections_timed_out_total", "reason" => reason).increment(1);
}

/// Which replica of `addresses` holds the discovery stream (`None`: none).
pub fn control_plane_replica(addresses: &[String], connected: Option<&str>) {
    for address in addresses {
        let value = if Some(address.as_str()) == connected { 1.0 } else { 0.0 };
        metrics::gauge!("trellis_control_plane_replica", "address" => address.clone()).set(value);
    }
}

pub fn control_plane_connected(connected: bool) {
    metrics::gauge!("trellis_control_plane_connected").set(if connected { 1.0 } else { 0.0 });
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Process and runtime figures, refreshed just before each scrape is rendered.
pub fn record_process() {
    if let Some(p) = crate::process::ProcessStats::read() {
        metrics::gauge!("process_resident_memory_bytes").set(p.resident_bytes as f64);
        metrics::counter!("process_cpu_seconds_total").absolute(p.cpu_seconds.floor() as u64);
        metrics::gauge!("process_open_fds").set(p.open_fds as f64);
        metrics::gauge!("process_start_time_seconds").set(p.start_time_seconds);
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let m = runtime.metrics();
        metrics::gauge!("tokio_workers").set(m.num_workers() as f64);
        metrics::gauge!("tokio_alive_tasks").set(m.num_alive_tasks() as f64);
        metrics::gauge!("tokio_global_queue_depth").set(m.global_queue_depth() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(flags: Flags, source_workload: &str) -> TrafficKey {
        let id = SpiffeId::workload("td", "ns", "sa").unwrap();
        TrafficKey {
            reporter: Reporter::Destination,
            source: PeerLabels::new(&id, source_workload, "ns"),
            destination: PeerLabels::new(&id, "server", "ns"),
            mutual_tls: true,
            flags,
        }
    }

    fn line<'a>(text: &'a str, name: &str, needle: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(name) && l.contains(needle))
    }

    #[test]
    fn traffic_series_render_with_istio_labels_one_handle_per_label_set() {
        let recorder = builder(SERIES_IDLE_TIMEOUT).unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let traffic = TrafficMetrics::default();
            let series = traffic.tcp(key(Flags::None, "client"));
            series.opened();
            series.closed(100, 7);
            traffic.tcp(key(Flags::Deny, "client")).opened();
            assert!(Arc::ptr_eq(&series, &traffic.tcp(key(Flags::None, "client"))), "one handle per label set");

            let text = handle.render();
            let opened = line(&text, "istio_tcp_connections_opened_total", "response_flags=\"-\"").unwrap();
            for label in [
                "reporter=\"destination\"",
                "source_principal=\"td/ns/ns/sa/sa\"",
                "source_workload=\"client\"",
                "destination_workload=\"server\"",
                "connection_security_policy=\"mutual_tls\"",
            ] {
                assert!(opened.contains(label), "{label} missing from {opened}");
            }
            assert!(opened.ends_with(" 1"), "{opened}");
            assert!(line(&text, "istio_tcp_received_bytes_total", "\"-\"").unwrap().ends_with(" 100"));
            assert!(line(&text, "istio_tcp_sent_bytes_total", "\"-\"").unwrap().ends_with(" 7"));
            assert!(line(&text, "istio_tcp_connections_opened_total", "DENY").is_some());
        });
    }

    /// Request and response sizes are histograms with Istio's buckets and the labels of `istio_requests_total`.
    #[test]
    fn http_series_have_size_histograms_with_istio_buckets_and_labels() {
        let recorder = builder(SERIES_IDLE_TIMEOUT).unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let traffic = TrafficMetrics::default();
            traffic.http(key(Flags::None, "client"), 200).record(Duration::from_millis(3), 120, 70_000);
            let text = handle.render();
            let requests = line(&text, "istio_requests_total", "response_code=\"200\"").unwrap();
            let labels = &requests[requests.find('{').unwrap()..=requests.find('}').unwrap()];
            for name in ["istio_request_bytes", "istio_response_bytes", "istio_request_duration_milliseconds"] {
                let buckets: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
                    .map(|l| l.split("le=\"").nth(1).unwrap().split('"').next().unwrap())
                    .collect();
                let want: Vec<String> = ISTIO_BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".into()]).collect();
                assert_eq!(buckets, want, "{name}");
                let count = line(&text, &format!("{name}_count"), "").unwrap();
                assert_eq!(&count[count.find('{').unwrap()..=count.find('}').unwrap()], labels, "{name}: same labels");
            }
            assert!(line(&text, "istio_request_bytes_sum", "").unwrap().ends_with(" 120"));
            assert!(line(&text, "istio_response_bytes_sum", "").unwrap().ends_with(" 70000"));
            let bucket = |le: &str| line(&text, "istio_response_bytes_bucket", &format!("le=\"{le}\"")).unwrap();
            assert!(bucket("60000").ends_with(" 0") && bucket("300000").ends_with(" 1"), "{text}");
        });
    }

    #[test]
    fn series_of_a_workload_that_left_expire_while_live_ones_stay() {
        let idle = Duration::from_millis(300);
        let recorder = builder(idle).unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let traffic = TrafficMetrics::default();
            traffic.tcp(key(Flags::None, "client")).opened();
            traffic.tcp(key(Flags::None, "other")).opened();
            let present = HashSet::from([("ns".into(), "server".into()), ("ns".into(), "other".into())]);
            // The exporter notices idleness between renders, as it does between Prometheus's scrapes.
            for _ in 0..5 {
                handle.render();
                std::thread::sleep(idle / 3);
                traffic.upkeep(&present);
            }
            assert_eq!(traffic.tcp.len(), 1, "the departed client's series are forgotten at once");
            let text = handle.render();
            assert!(line(&text, "istio_tcp_connections_opened_total", "source_workload=\"other\"").is_some(), "{text}");
            assert!(
                line(&text, "istio_tcp_connections_opened_total", "source_workload=\"client\"").is_none(),
                "{text}"
            );
        });
    }

    #[test]
    fn decisions_are_counted_under_the_deciding_policy() {
        let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: ns}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["td/ns/evil/sa/x"]}}]}]
"#;
        let resources = trellis_policy::parse_documents(yaml).unwrap();
        let compiled = trellis_policy::CompiledPolicies::compile(&resources, "trellis-system").unwrap();
        let policies = compiled.for_workload("ns", &Default::default());
        let recorder = builder(SERIES_IDLE_TIMEOUT).unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let counters = DecisionCounters::build([&policies]);
            let ip = "10.0.0.1".parse().unwrap();
            let denied = policies.evaluate(&trellis_policy::Request::tcp(Some("td/ns/evil/sa/x"), ip, ip, 80));
            counters.record(&denied);
            counters.record_closed(&denied);
            let allowed = policies.evaluate(&trellis_policy::Request::tcp(Some("td/ns/ns/sa/ok"), ip, ip, 80));
            counters.record(&allowed);
            let text = handle.render();
            let find = |needle: &str| {
                text.lines()
                    .find(|l| l.starts_with("trellis_authz_decisions_total") && l.contains(needle))
                    .map(str::to_owned)
            };
            let denied = find("result=\"denied\"").unwrap();
            assert!(denied.contains("action=\"DENY\"") && denied.contains("policy=\"ns/deny-evil\""), "{denied}");
            assert!(find("closed_on_reevaluation").unwrap().contains("ns/deny-evil"));
            let allowed = find("result=\"allowed\"").unwrap();
            assert!(allowed.contains("policy=\"none\"") && allowed.ends_with(" 1"), "{allowed}");
        });
    }
}
