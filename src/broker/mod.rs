//! Everything RabbitMQ: connecting, the topology of CONTRACT.md section 3,
//! confirmed publishing, and the headers decisions carry between deliveries.
//! The broker never knows a provider.

pub mod headers;
pub mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

pub use publisher::{PublishError, Publisher};
pub use topology::Topology;

/// Opens a connection named after its role, so operators can tell worker,
/// tool and test connections apart in the management UI.
pub async fn connect(url: &SecretString, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    Connection::connect(url.expose_secret(), props).await
}
