//! The library's producer: an idempotency key on every message.
use std::collections::HashSet;
use std::time::Duration;

use integration_tests::TestEnv;

#[tokio::test]
async fn the_producer_stamps_every_message_with_a_unique_idempotency_key() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let env = TestEnv::new().await;
    let topic = env.kafka.topic("producer");
    exactly_once::runtime::worker::create_topics(&env.kafka, std::slice::from_ref(&topic)).await.unwrap();
    let producer = exactly_once::producer::Producer::new(&env.kafka).unwrap();
    for _ in 0..5 {
        producer.send(&topic, None, b"{}", None).await.unwrap();
    }
    producer.send(&topic, None, b"{}", Some("chosen-key")).await.unwrap();

    let mut config = exactly_once::runtime::worker::client_config(&env.kafka);
    config.set("group.id", &env.kafka.group_id).set("auto.offset.reset", "earliest");
    let keys = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        let mut keys = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while keys.len() < 6 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
                let h = m.headers().expect("headers");
                let key = h.iter().find(|h| h.key == "idempotency_key").and_then(|h| h.value).expect("idempotency_key");
                keys.push(String::from_utf8(key.to_vec()).unwrap());
            }
        }
        keys
    })
    .await
    .unwrap();
    assert_eq!(keys.len(), 6);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 6, "every key is unique");
    assert!(keys.contains(&"chosen-key".to_owned()));
}
