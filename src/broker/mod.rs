//! Everything RabbitMQ: connecting, the topology of CONTRACT.md section 3,
//! the consuming session, one delivered decision and the ways to settle it,
//! confirmed publishing, and the headers decisions carry between deliveries.
//! The broker never knows a provider.

pub(crate) mod delivery;
pub(crate) mod headers;
pub(crate) mod publisher;
pub(crate) mod session;
mod topology;

use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

pub(crate) use delivery::{Delivery, History, PendingConfirmation, outcome_properties};
pub(crate) use publisher::{PublishError, Publisher};
pub(crate) use session::Session;
pub use topology::Topology;

/// Opens a connection named after its role, so operators can tell worker,
/// tool and test connections apart in the management UI.
pub(crate) async fn connect(url: &SecretString, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    Connection::connect(url.expose_secret(), props).await
}
