//! The attributes of one connection (TCP) or request (HTTP), borrowed from the proxy's own buffers so that a check
//! copies nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;

/// What an authorization check sees. Build it with [`Request::tcp`] and the `with_*` methods, or fill the fields.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Peer identity from the mTLS client certificate: the SPIFFE ID **without** `spiffe://`
    /// (`cluster.local/ns/foo/sa/sleep`). `None` for a plaintext peer, which then has no principal, namespace,
    /// service account or trust domain.
    pub source_principal: Option<&'a str>,
    /// Peer address of the connection (`source.ip`, `ipBlocks`).
    pub source_ip: IpAddr,
    /// Original client address (`remote.ip`, `remoteIpBlocks`): `source_ip` unless the proxy learned it from
    /// X-Forwarded-For or the PROXY protocol.
    pub remote_ip: IpAddr,
    /// Local address the connection was made to (`destination.ip`).
    pub destination_ip: IpAddr,
    /// The workload (target) port, not the Service port (`ports`, `destination.port`).
    pub destination_port: u16,
    /// TLS SNI the client asked for (`connection.sni`), if any.
    pub sni: Option<&'a str>,
    /// Envoy-style dynamic metadata `{"<filter>": {"<key>": value}}` for `experimental.envoy.filters.*`
    /// conditions. Trellis runs no Envoy filters, so proxies pass `None` and such conditions see an absent value.
    pub filter_metadata: Option<&'a serde_json::Value>,
    pub protocol: Protocol<'a>,
}

/// How the port's traffic is understood. HTTP-only policy attributes are handled differently on TCP (Istio §2.9).
#[derive(Debug, Clone, Copy)]
pub enum Protocol<'a> {
    Tcp,
    Http(HttpRequest<'a>),
}

/// The HTTP part of a request.
#[derive(Clone, Copy)]
pub struct HttpRequest<'a> {
    /// `:method`, as received (Istio rejects non-upper-case methods before authorization).
    pub method: &'a str,
    /// Request target after the proxy's path normalization. A `?query` or `#fragment` is ignored by `paths`.
    pub path: &'a str,
    /// `:authority` / `Host`, possibly with `:port`; `None` when the request has none.
    pub host: Option<&'a str>,
    /// Request headers; names compare case-insensitively, repeated headers are joined with `,` (as Envoy does).
    pub headers: &'a dyn Headers,
    /// The verified JWT payload (RequestAuthentication); `None` when no token was presented. The request
    /// principal is `iss`/`sub`, the audiences `aud`, the presenter `azp`.
    pub jwt: Option<&'a serde_json::Value>,
}

impl<'a> Request<'a> {
    /// A TCP connection; `remote_ip` starts equal to `source_ip`.
    pub fn tcp(
        source_principal: Option<&'a str>,
        source_ip: IpAddr,
        destination_ip: IpAddr,
        destination_port: u16,
    ) -> Request<'a> {
        Request {
            source_principal,
            source_ip,
            remote_ip: source_ip,
            destination_ip,
            destination_port,
            sni: None,
            filter_metadata: None,
            protocol: Protocol::Tcp,
        }
    }

    /// The same connection carrying an HTTP request.
    pub fn with_http(self, http: HttpRequest<'a>) -> Request<'a> {
        Request { protocol: Protocol::Http(http), ..self }
    }

    pub fn with_remote_ip(self, remote_ip: IpAddr) -> Request<'a> {
        Request { remote_ip, ..self }
    }

    pub fn with_sni(self, sni: &'a str) -> Request<'a> {
        Request { sni: Some(sni), ..self }
    }

    pub fn is_http(&self) -> bool {
        matches!(self.protocol, Protocol::Http(_))
    }

    pub fn http(&self) -> Option<&HttpRequest<'a>> {
        match &self.protocol {
            Protocol::Http(h) => Some(h),
            Protocol::Tcp => None,
        }
    }
}

impl<'a> HttpRequest<'a> {
    /// A request without host, headers or token.
    pub fn new(method: &'a str, path: &'a str) -> HttpRequest<'a> {
        HttpRequest { method, path, host: None, headers: &NoHeaders, jwt: None }
    }

    pub fn with_host(self, host: &'a str) -> HttpRequest<'a> {
        HttpRequest { host: Some(host), ..self }
    }

    pub fn with_headers(self, headers: &'a dyn Headers) -> HttpRequest<'a> {
        HttpRequest { headers, ..self }
    }

    pub fn with_jwt(self, jwt: &'a serde_json::Value) -> HttpRequest<'a> {
        HttpRequest { jwt: Some(jwt), ..self }
    }
}

impl fmt::Debug for HttpRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .field("jwt", &self.jwt)
            .finish_non_exhaustive()
    }
}

/// Read access to request headers without copying them; implement it for the proxy's header map.
pub trait Headers {
    /// Calls `f` with every value of the header `name` (given in lower case; compare ignoring ASCII case), in
    /// request order. Calls nothing when the header is absent.
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str));
}

/// A request without headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHeaders;

impl Headers for NoHeaders {
    fn for_each_value<'s>(&'s self, _name: &str, _f: &mut dyn FnMut(&'s str)) {}
}

impl<T: Headers + ?Sized> Headers for &T {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        (**self).for_each_value(name, f)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Headers for [(K, V)] {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        for (k, v) in self {
            if k.as_ref().eq_ignore_ascii_case(name) {
                f(v.as_ref());
            }
        }
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> Headers for [(K, V); N] {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        self.as_slice().for_each_value(name, f)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Headers for Vec<(K, V)> {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        self.as_slice().for_each_value(name, f)
    }
}

/// Keys may be in any case (e.g. a JSON object), so every key is compared.
impl<V: AsRef<str>> Headers for BTreeMap<String, V> {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        for (k, v) in self {
            if k.eq_ignore_ascii_case(name) {
                f(v.as_ref());
            }
        }
    }
}

impl<V: AsRef<str>, S: BuildHasher> Headers for HashMap<String, V, S> {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        for (k, v) in self {
            if k.eq_ignore_ascii_case(name) {
                f(v.as_ref());
            }
        }
    }
}

/// The parts of a peer principal that policies refer to, sliced out of it (no copies). Mirrors istiod's regexes
/// over the URI SAN: namespace = the segment after the first `ns` segment (`.*/ns/<ns>/.*`), service account =
/// the segment after a later `sa` segment (`/ns/<ns>/(.+/|)sa/<sa>(/.+)?`), trust domain = text before the
/// first `/`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Peer<'a> {
    pub(crate) principal: Option<&'a str>,
    pub(crate) trust_domain: Option<&'a str>,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) service_account: Option<&'a str>,
}

impl<'a> Peer<'a> {
    pub(crate) fn parse(principal: Option<&'a str>) -> Peer<'a> {
        let Some(p) = principal else { return Peer::default() };
        let mut peer =
            Peer { principal: Some(p), trust_domain: p.split_once('/').map(|(td, _)| td), ..Peer::default() };
        let mut segments = p.split('/').skip(1).peekable();
        while let Some(segment) = segments.next() {
            if segment != "ns" {
                continue;
            }
            // The namespace must be followed by another segment (`/ns/<ns>/`).
            let ns = segments.next().filter(|_| segments.peek().is_some());
            if ns.is_some() {
                peer.namespace = ns;
                peer.service_account = segments.by_ref().skip_while(|s| *s != "sa").nth(1);
            }
            break;
        }
        peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_parts() {
        let p = Peer::parse(Some("cluster.local/ns/foo/sa/sleep"));
        assert_eq!(p.trust_domain, Some("cluster.local"));
        assert_eq!(p.namespace, Some("foo"));
        assert_eq!(p.service_account, Some("sleep"));
        let p = Peer::parse(Some("td/ns/foo/extra/sa/sleep/x"));
        assert_eq!((p.namespace, p.service_account), (Some("foo"), Some("sleep")));
        let p = Peer::parse(Some("td/ns/foo"));
        assert_eq!((p.trust_domain, p.namespace, p.service_account), (Some("td"), None, None));
        let p = Peer::parse(Some("ns/bar/x"));
        assert_eq!(p.namespace, None, "the trust domain segment is never the `ns` marker");
        let p = Peer::parse(Some("opaque"));
        assert_eq!((p.principal, p.trust_domain, p.namespace), (Some("opaque"), None, None));
        assert_eq!(Peer::parse(None), Peer::default());
    }

    #[test]
    fn header_sources() {
        let collect = |h: &dyn Headers, name: &str| {
            let mut out = Vec::new();
            h.for_each_value(name, &mut |v| out.push(v.to_string()));
            out
        };
        let arr = [("X-A", "1"), ("x-a", "2"), ("b", "3")];
        assert_eq!(collect(&arr, "x-a"), ["1", "2"]);
        let slice: &[(&str, &str)] = &arr;
        assert_eq!(collect(&slice, "b"), ["3"]);
        let map: BTreeMap<String, String> = [("Content-Type".to_string(), "json".to_string())].into();
        assert_eq!(collect(&map, "content-type"), ["json"]);
        assert!(collect(&NoHeaders, "x").is_empty());
    }
}
