//! Everything RabbitMQ: connecting, the topology of CONTRACT.md section 3,
//! the consuming session, one delivered decision and the ways to settle it,
//! confirmed publishing, and the headers decisions carry between deliveries.
//! The broker never knows a provider.

pub(crate) mod delivery;
pub(crate) mod headers;
pub(crate) mod probe;
pub(crate) mod publisher;
pub(crate) mod session;
mod topology;

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use tracing::warn;

pub(crate) use delivery::{Delivery, History, Origin, PendingConfirmation, outcome_properties};
pub(crate) use publisher::{PublishError, Publisher};
pub(crate) use session::Session;
pub use topology::{Mismatch, Topology, TopologyError};

use crate::settings::{AmqpNodes, Settings};

/// The broker's nodes (`APPROVAL_AMQP__URL`) and how long each may take to
/// answer, so a node that black-holes packets costs one timeout, not the
/// operating system's minutes-long TCP give-up.
#[derive(Debug, Clone)]
pub(crate) struct Nodes {
    urls: AmqpNodes,
    timeout: Duration,
}

/// Why one node gave no connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    #[error("{0}")]
    Refused(#[from] lapin::Error),
    #[error("no answer within {} ms", .0.as_millis())]
    NoAnswer(Duration),
}

/// No node gave a connection: each node tried, with why, in order.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|(node, e)| format!("{node}: {e}")).collect::<Vec<_>>().join("; "))]
pub(crate) struct Unreachable(Vec<(String, NodeError)>);

impl Nodes {
    pub(crate) fn new(settings: &Settings) -> Self {
        Self {
            urls: settings.amqp.url.clone(),
            // A TLS handshake with a loaded broker needs a moment even when
            // the provider-facing timeout is set very low.
            timeout: settings.worker.connect_timeout.max(Duration::from_secs(1)),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.urls.len()
    }

    /// Node `i` with its password masked, as logs and reports name it.
    pub(crate) fn redacted(&self, i: usize) -> String {
        self.urls.redacted(i)
    }

    /// Connects to the first node that answers, in the configured order.
    pub(crate) async fn connect(&self, name: &str) -> Result<Connection, Unreachable> {
        self.connect_from(0, name).await.map(|(conn, _)| conn)
    }

    /// Tries every node once, starting with node `first` and going round
    /// the list; returns the connection and the index of the node that gave
    /// it.
    pub(crate) async fn connect_from(
        &self,
        first: usize,
        name: &str,
    ) -> Result<(Connection, usize), Unreachable> {
        let mut failures = Vec::new();
        for i in (first..first + self.len()).map(|i| i % self.len()) {
            match self.connect_node(i, name).await {
                Ok(conn) => {
                    // When every node fails, the caller reports them all at once.
                    for (node, e) in &failures {
                        warn!(%node, error = %e, "broker node not reachable; tried the next");
                    }
                    return Ok((conn, i));
                }
                Err(e) => failures.push((self.redacted(i), e)),
            }
        }
        Err(Unreachable(failures))
    }

    /// Connects to node `i` alone, within the per-node timeout.
    pub(crate) async fn connect_node(&self, i: usize, name: &str) -> Result<Connection, NodeError> {
        match tokio::time::timeout(self.timeout, connect_url(self.urls.url(i), name)).await {
            Ok(conn) => Ok(conn?),
            Err(_) => Err(NodeError::NoAnswer(self.timeout)),
        }
    }
}

/// Opens a connection to one URL, named after its role, so operators can
/// tell worker, tool and test connections apart in the management UI.
pub(crate) async fn connect_url(
    url: &SecretString,
    name: &str,
) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    Connection::connect(url.expose_secret(), props).await
}
