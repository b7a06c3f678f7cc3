//! Sensors, a dashboard and a narrowly-keyed garage monitor: wildcards and grants.
//!
//! ```sh
//! cargo run -p whispeer --features in-process --example sensors
//! ```
//!
//! The sensors publish on `sensor/<room>/<kind>`. The dashboard holds the whole tree and
//! subscribes to `sensor/+/temp`; the garage monitor holds only a grant for
//! `sensor/garage/#` (derived from the tree key, given out of band), so it can subscribe to
//! `sensor/garage/#` and gets `NoKey` for the kitchen (a wider filter such as `sensor/+/temp`
//! would deliver only what its grant covers).

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use whispeer::{Broker, Client, Encryption, Identity, InProcess, Keyring, Scope, Topic};

#[derive(Debug, Serialize, Deserialize)]
struct Reading {
    value: f64,
    unit: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let sensors = broker.client().await?;
    let dashboard = broker.client().await?;

    // The garage monitor gets a grant for one subtree only.
    let grant = broker
        .tree_key()
        .expect("a broker with a fresh tree holds its key")
        .grant(&Scope::Subtree(Topic::new("sensor/garage")?));
    let mut keys = Keyring::new();
    keys.add_grant(grant)?;
    let garage = Client::builder()
        .with(InProcess::new(broker.relay().clone()))
        .with(Encryption::with_keyring(keys))
        .with(Identity::generate())
        .connect()
        .await?;
    match garage.subscribe::<Reading>("sensor/kitchen/#").await {
        Err(e) => println!("garage monitor cannot watch the kitchen: {e}"),
        Ok(_) => anyhow::bail!("a sensor/garage grant must not cover the kitchen"),
    }

    let mut temps = dashboard.subscribe::<Reading>("sensor/+/temp").await?;
    let mut garage_all = garage.subscribe::<Reading>("sensor/garage/#").await?;

    let readings = [
        ("sensor/kitchen/temp", 21.5, "°C"),
        ("sensor/garage/temp", 9.0, "°C"),
        ("sensor/garage/door", 1.0, "open"),
        ("sensor/bedroom/humidity", 40.0, "%"),
        ("sensor/bedroom/temp", 19.0, "°C"),
    ];
    for (topic, value, unit) in readings {
        sensors
            .publish(
                topic,
                &Reading {
                    value,
                    unit: unit.into(),
                },
            )
            .await?;
    }
    let wait = Duration::from_secs(10);
    for _ in 0..3 {
        let m = tokio::time::timeout(wait, temps.next()).await?.unwrap()?;
        println!(
            "dashboard  {:<22} {} {}",
            m.topic, m.value.value, m.value.unit
        );
    }
    for _ in 0..2 {
        let m = tokio::time::timeout(wait, garage_all.next())
            .await?
            .unwrap()?;
        println!(
            "garage     {:<22} {} {}",
            m.topic, m.value.value, m.value.unit
        );
    }
    for c in [sensors, dashboard, garage] {
        c.close().await;
    }
    broker.shutdown().await?;
    Ok(())
}
