//! Publishing with publisher confirms. A publish counts only once the broker
//! acknowledged it and did not return it; callers acknowledge a decision
//! only after every publish it needs succeeded.

use lapin::{
    BasicProperties, Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker channel failed during publish: {0}")]
    Broker(#[from] lapin::Error),
    #[error("broker refused the message (nack); it was not stored")]
    Nacked,
    #[error("broker returned the message as unroutable ({0}); is the topology declared?")]
    Returned(String),
    #[error("publisher confirms are not enabled on this channel")]
    Unconfirmed,
}

#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn new(channel: Channel) -> Result<Self, lapin::Error> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for this message's confirm. Many tasks publish
    /// concurrently on the one channel; confirms resolve independently.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::NotRequested => Err(PublishError::Unconfirmed),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Returned(
                returned.reply_text.as_str().to_owned(),
            )),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}
