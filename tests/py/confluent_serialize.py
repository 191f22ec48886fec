"""Records framed for a schema registry by Confluent's own Python serializers.

The payload tests use this so that the bytes our decoder reads come from a client
nobody here wrote: confluent-kafka's AvroSerializer (fastavro underneath),
JSONSerializer (jsonschema underneath; it validates first) or ProtobufSerializer
(Google's protobuf runtime) registers the schema with the registry and writes the
magic byte, the schema id (for Protobuf, the message indexes) and the datum.

    confluent_serialize.py encode  --registry URL [--user U --password P]
                                   [--format avro|json|protobuf] [--schema-file F]
                                   [--message Order|Refund|Priced]
                                   [--reference NAME=SUBJECT=FILE ...]
                                   [--field value|key] < records.jsonl
        prints each framed value as hex, one per line
    confluent_serialize.py produce --registry URL --brokers B --topic T < orders.jsonl
        produces each order to T (key: its order_id), prints how many were delivered

Without --schema-file the records are orders in Avro, JSON objects one per line:
{"order_id": str, "amount": int, "note": str|null}; with it, any records of that
schema, in --format (avro by default; json for a JSON Schema). With --format protobuf
the records are messages of shop/order.proto, built below without protoc: `Order`
(order_id, amount, note, placed_at as a google.protobuf.Timestamp, total as a
shop.common.Money from an imported file, lines as repeated nested `Line`) or, with
--message Refund, the file's second message; the serializer registers the imported
file as a reference and skips the well-known one.
"""
import argparse
import json
import sys

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def protobuf_classes():
    """shop/common.proto and shop/order.proto as the protobuf compiler would describe
    them, and the generated message classes."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

    F = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    ts = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(ts)
    pool.Add(ts)

    def field(msg, name, number, kind, type_name=None, repeated=False):
        f = msg.field.add(name=name, number=number, type=kind)
        f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
        if type_name:
            f.type_name = type_name

    common = descriptor_pb2.FileDescriptorProto(name="shop/common.proto", package="shop.common", syntax="proto3")
    money = common.message_type.add(name="Money")
    field(money, "cents", 1, F.TYPE_INT64)
    field(money, "currency", 2, F.TYPE_STRING)
    pool.Add(common)

    order_file = descriptor_pb2.FileDescriptorProto(name="shop/order.proto", package="shop", syntax="proto3")
    order_file.dependency.extend(["shop/common.proto", "google/protobuf/timestamp.proto"])
    order = order_file.message_type.add(name="Order")
    field(order, "order_id", 1, F.TYPE_STRING)
    field(order, "amount", 2, F.TYPE_INT64)
    field(order, "note", 3, F.TYPE_STRING)
    field(order, "placed_at", 4, F.TYPE_MESSAGE, ".google.protobuf.Timestamp")
    field(order, "total", 5, F.TYPE_MESSAGE, ".shop.common.Money")
    field(order, "lines", 6, F.TYPE_MESSAGE, ".shop.Order.Line", repeated=True)
    line = order.nested_type.add(name="Line")
    field(line, "sku", 1, F.TYPE_STRING)
    field(line, "quantity", 2, F.TYPE_INT32)
    refund = order_file.message_type.add(name="Refund")
    field(refund, "order_id", 1, F.TYPE_STRING)
    field(refund, "amount", 2, F.TYPE_INT64)
    pool.Add(order_file)

    # shop/priced.proto imports Google's common types (googleapis-common-protos), which
    # the serializer never registers as references: every client is expected to have them.
    from google.type import date_pb2, money_pb2

    for module in (money_pb2, date_pb2):
        common_type = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(common_type)
        pool.Add(common_type)
    priced_file = descriptor_pb2.FileDescriptorProto(name="shop/priced.proto", package="shop", syntax="proto3")
    priced_file.dependency.extend(["google/type/money.proto", "google/type/date.proto"])
    priced = priced_file.message_type.add(name="Priced")
    field(priced, "order_id", 1, F.TYPE_STRING)
    field(priced, "price", 2, F.TYPE_MESSAGE, ".google.type.Money")
    field(priced, "due", 3, F.TYPE_MESSAGE, ".google.type.Date")
    pool.Add(priced_file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"shop.{name}"))
        for name in ("Order", "Refund", "Priced")
    }

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
    parser.add_argument("--format", choices=["avro", "json", "protobuf"], default="avro")
    parser.add_argument("--message", choices=["Order", "Refund", "Priced"], default="Order")
    # NAME=SUBJECT=FILE, repeatable: an Avro schema FILE registered under SUBJECT, which
    # the schema refers to by its full NAME (a schema reference, as Confluent's docs show).
    parser.add_argument("--reference", action="append", default=[])
    # Frame for the record's key (subject <topic>-key) instead of its value.
    parser.add_argument("--field", choices=["value", "key"], default="value")
    args = parser.parse_args()

    conf = {"url": args.registry}
    if args.user:
        conf["basic.auth.user.info"] = f"{args.user}:{args.password or ''}"
    schema = ORDER_SCHEMA
    if args.schema_file:
        with open(args.schema_file) as f:
            schema = f.read()
    client = SchemaRegistryClient(conf)
    orders = [json.loads(line) for line in sys.stdin if line.strip()]
    if args.format == "protobuf":
        from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
        from google.protobuf import json_format

        message_class = protobuf_classes()[args.message]
        proto = ProtobufSerializer(message_class, client)

        def serializer(o, ctx):
            return proto(json_format.ParseDict(o, message_class()), ctx)
    elif args.reference:
        from confluent_kafka.schema_registry import Schema, SchemaReference

        kind = "JSON" if args.format == "json" else "AVRO"
        references = []
        for spec in args.reference:
            name, subject, path = spec.split("=", 2)
            with open(path) as f:
                client.register_schema(subject, Schema(f.read(), kind))
            version = client.get_latest_version(subject).version
            references.append(SchemaReference(name, subject, version))
        if kind == "JSON":
            serializer = JSONSerializer(Schema(schema, "JSON", references), client)
        else:
            serializer = AvroSerializer(client, Schema(schema, "AVRO", references))
    elif args.format == "json":
        serializer = JSONSerializer(schema, client)
    else:
        serializer = AvroSerializer(client, schema)
    field = MessageField.KEY if args.field == "key" else MessageField.VALUE
    context = SerializationContext(args.topic, field)
    if not args.schema_file and args.format != "protobuf" and not args.reference:
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
