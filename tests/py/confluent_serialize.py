"""Records framed for a schema registry by Confluent's own Python serializers.

The payload tests use this so that the bytes our decoder reads come from a client
nobody here wrote: confluent-kafka's AvroSerializer (fastavro underneath) or
JSONSerializer (jsonschema underneath; it validates first) registers the schema with
the registry and writes the magic byte, the schema id and the datum.

    confluent_serialize.py encode  --registry URL [--user U --password P]
                                   [--format avro|json] [--schema-file F] < records.jsonl
        prints each framed value as hex, one per line
    confluent_serialize.py produce --registry URL --brokers B --topic T < orders.jsonl
        produces each order to T (key: its order_id), prints how many were delivered

Without --schema-file the records are orders in Avro, JSON objects one per line:
{"order_id": str, "amount": int, "note": str|null}; with it, any records of that
schema, in --format (avro by default; json for a JSON Schema).
"""
import argparse
import json
import sys

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

ORDER_SCHEMA = json.dumps({
    "type": "record",
    "name": "Order",
    "namespace": "shop",
    "fields": [
        {"name": "order_id", "type": "string"},
        {"name": "amount", "type": "long"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "placed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["encode", "produce"])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--brokers")
    parser.add_argument("--topic", default="orders")
    parser.add_argument("--schema-file")
    parser.add_argument("--format", choices=["avro", "json"], default="avro")
    args = parser.parse_args()

    conf = {"url": args.registry}
    if args.user:
        conf["basic.auth.user.info"] = f"{args.user}:{args.password or ''}"
    schema = ORDER_SCHEMA
    if args.schema_file:
        with open(args.schema_file) as f:
            schema = f.read()
    client = SchemaRegistryClient(conf)
    if args.format == "json":
        serializer = JSONSerializer(schema, client)
    else:
        serializer = AvroSerializer(client, schema)
    context = SerializationContext(args.topic, MessageField.VALUE)
    orders = [json.loads(line) for line in sys.stdin if line.strip()]
    if not args.schema_file:
        for o in orders:
            o.setdefault("note", None)
            o.setdefault("placed_at", 1_700_000_000_000)

    if args.mode == "encode":
        for o in orders:
            print(serializer(o, context).hex())
        return

    delivered = []
    errors = []

    def on_delivery(err, msg):
        (errors if err else delivered).append(err or msg.offset())

    producer = Producer({"bootstrap.servers": args.brokers, "enable.idempotence": False})
    for o in orders:
        producer.produce(args.topic, key=o["order_id"].encode(), value=serializer(o, context), on_delivery=on_delivery)
        producer.poll(0)
    producer.flush(60)
    if errors or len(delivered) != len(orders):
        sys.exit(f"delivered {len(delivered)} of {len(orders)}: {errors[:3]}")
    print(len(delivered))


if __name__ == "__main__":
    main()
