//! Worker discovery: a configured endpoint is a [`Target`] (scheme, host, port); a host name is
//! resolved through a [`Resolver`] into one address per replica (a Kubernetes headless Service
//! answers with every ready pod), and re-resolved periodically so replicas that come and go are
//! picked up without a restart. A literal IP address is its own single replica.

use std::io;
use std::net::{IpAddr, SocketAddr};

use axum::http::Uri;

/// One configured worker endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http` or `https`.
    pub scheme: String,
    /// As configured: a name to resolve, or an IP literal (without IPv6 brackets).
    pub host: String,
    pub port: u16,
    /// `scheme://host:port` as configured: the `:authority` of calls to its replicas, so a
    /// worker behind a name-based proxy sees the name, not the pod address.
    pub origin: Uri,
}

/// An endpoint that is not `http(s)://host:port`.
#[derive(Debug, thiserror::Error)]
#[error("worker endpoint '{0}' must be http(s)://host:port")]
pub struct InvalidTarget(pub String);

impl Target {
    /// Parses `http(s)://host:port` (what config validation produces).
    pub fn parse(endpoint: &str) -> Result<Target, InvalidTarget> {
        let invalid = || InvalidTarget(endpoint.to_string());
        let uri: Uri = endpoint.parse().map_err(|_| invalid())?;
        let scheme = match uri.scheme_str() {
            Some(scheme @ ("http" | "https")) => scheme.to_string(),
            _ => return Err(invalid()),
        };
        let authority = uri.authority().ok_or_else(invalid)?;
        let port = authority.port_u16().ok_or_else(invalid)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Target {
            scheme,
            host,
            port,
            origin: uri.clone(),
        })
    }

    /// The address itself when the host is an IP literal: nothing to resolve.
    pub fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }

    /// `scheme://address` of one replica: what its channel connects to.
    pub fn replica_uri(&self, address: SocketAddr) -> String {
        format!("{}://{address}", self.scheme)
    }
}

/// Turns a host name into the addresses of its replicas. A trait so that tests can move
/// replicas in and out without a DNS server.
#[async_trait::async_trait]
pub trait Resolver: Send + Sync {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// The system resolver (`getaddrinfo` through tokio), which honours /etc/hosts and the
/// cluster's DNS search path.
#[derive(Debug, Default)]
pub struct SystemResolver;

#[async_trait::async_trait]
impl Resolver for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// The distinct addresses of `target` now, sorted so that replica order is stable.
pub async fn addresses(target: &Target, resolver: &dyn Resolver) -> io::Result<Vec<SocketAddr>> {
    let mut addresses = match target.literal() {
        Some(address) => vec![address],
        None => resolver.resolve(&target.host, target.port).await?,
    };
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_normalised_endpoints() {
        let target = Target::parse("http://worker.ns.svc:50051").expect("valid");
        assert_eq!(target.host, "worker.ns.svc");
        assert_eq!(target.port, 50051);
        assert_eq!(target.literal(), None);
        assert_eq!(
            target.origin.authority().map(|a| a.as_str()),
            Some("worker.ns.svc:50051")
        );

        let v6 = Target::parse("http://[::1]:7").expect("valid");
        assert_eq!(v6.literal(), Some("[::1]:7".parse().expect("address")));
        assert_eq!(
            v6.replica_uri("[::1]:7".parse().expect("address")),
            "http://[::1]:7"
        );

        for bad in ["worker:1", "ftp://w:1", "http://w"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn literals_are_not_resolved_and_names_are() {
        struct Refuse;
        #[async_trait::async_trait]
        impl Resolver for Refuse {
            async fn resolve(&self, host: &str, _: u16) -> io::Result<Vec<SocketAddr>> {
                Err(io::Error::other(format!("asked to resolve {host}")))
            }
        }
        let literal = Target::parse("http://127.0.0.1:9").expect("valid");
        assert_eq!(
            addresses(&literal, &Refuse).await.expect("no lookup"),
            vec!["127.0.0.1:9".parse().expect("address")]
        );
        let localhost = Target::parse("http://localhost:9").expect("valid");
        let found = addresses(&localhost, &SystemResolver)
            .await
            .expect("localhost resolves");
        assert!(found.iter().all(|a| a.ip().is_loopback() && a.port() == 9));
        assert!(!found.is_empty());
    }
}
