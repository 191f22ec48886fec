"""Records framed for the AWS Glue Schema Registry by a Glue serializer nobody here wrote.

The payload tests use this so that the bytes our decoder reads come from a third-party
client: the `aws-glue-schema-registry` package from PyPI (its KafkaSerializer, over
fastavro for Avro and fastjsonschema for JSON Schema; boto3's Glue client underneath)
creates or finds the schema in the registry (CreateSchema, RegisterSchemaVersion,
GetSchemaByDefinition, GetSchemaVersion) and writes Glue's frame: the header version
byte 3, the compression byte, the schema version's 16-byte UUID, then the datum.

    glue_serialize.py encode --endpoint URL --registry NAME --topic T
                             [--format avro|json] [--schema-file F] [--compress]
                             < records.jsonl
        prints each framed value as hex, one per line

    glue_serialize.py encode ... --format protobuf --schema-file F.proto
        each line is {"message": FULL_NAME, "value": {...proto3 JSON...}}

Protobuf: the package does Avro and JSON Schema only, and Glue's Protobuf serializer is
Java's. So the schema is compiled by Google's protoc (grpcio-tools), the message built
and encoded by Google's protobuf runtime, the definition registered through the
package's client (its text, as Glue keeps it) and the frame written by the package's
codec. What is ours is the message index before the message, written as the Java
serializer writes it (its MessageIndexFinder and ProtobufWireFormatEncoder): one
unsigned varint, the message's position among all the file's messages (nested ones and
map entries included, breadth first) sorted by full name.

No Glue registry runs here: --endpoint is the tests' stand-in serving Glue's JSON API
(`integration_tests::glue`). Without --schema-file the records are the orders of the
Confluent tests (an Avro record). --compress re-frames each value with the package's
own codec and zlib compression (byte 5), as its Java counterpart writes when
compression is on.
"""
import argparse
import json
import sys

import boto3
from aws_schema_registry import DataAndSchema, KafkaSerializer, SchemaRegistryClient
from aws_schema_registry.avro import AvroSchema
from aws_schema_registry.codec import decode, encode
from aws_schema_registry.jsonschema import JsonSchema

ORDER = {
    "type": "record",
    "name": "Order",
    "namespace": "shop",
    "fields": [
        {"name": "order_id", "type": "string"},
        {"name": "amount", "type": "long"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "placed_at", "type": "long", "default": 1700000000000},
    ],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["encode"])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--format", choices=["avro", "json", "protobuf"], default="avro")
    p.add_argument("--schema-file")
    p.add_argument("--compress", action="store_true")
    a = p.parse_args()

    glue = boto3.client(
        "glue",
        endpoint_url=a.endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
    )
    client = SchemaRegistryClient(glue, registry_name=a.registry, wait_interval_seconds=0)
    if a.format == "protobuf":
        return encode_protobuf(client, a)
    serializer = KafkaSerializer(client)
    if a.schema_file:
        with open(a.schema_file) as f:
            text = f.read()
        schema = AvroSchema(text) if a.format == "avro" else JsonSchema(text)
    else:
        schema = AvroSchema(json.dumps(ORDER))
    for line in sys.stdin:
        if not line.strip():
            continue
        record = json.loads(line)
        if a.format == "avro" and not a.schema_file:
            record.setdefault("placed_at", 1700000000000)
        value = serializer.serialize(a.topic, DataAndSchema(record, schema))
        if a.compress:
            data, version = decode(value)
            value = encode(data, version, compression=True)
        print(value.hex())


def glue_message_indexes(file_descriptor):
    """Each message's Glue index by full name: breadth first, then sorted by name."""
    queue = list(file_descriptor.message_types_by_name.values())
    everything = []
    while queue:
        message = queue.pop(0)
        everything.append(message)
        queue.extend(message.nested_types)
    everything.sort(key=lambda m: m.full_name)
    return {m.full_name: i for i, m in enumerate(everything)}


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_protobuf(client, a):
    import os
    import tempfile

    import grpc_tools
    from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
    from grpc_tools import protoc

    with open(a.schema_file) as f:
        definition = f.read()
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    # googleapis-common-protos ships google/type/*.proto beside its modules.
    site = os.path.dirname(os.path.dirname(os.path.dirname(descriptor_pb2.__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        name = "shop.proto"
        with open(os.path.join(tmp, name), "w") as f:
            f.write(definition)
        out = os.path.join(tmp, "set.pb")
        rc = protoc.main(["protoc", f"-I{tmp}", f"-I{site}", f"-I{well_known}",
                          "--include_imports", f"--descriptor_set_out={out}", name])
        if rc != 0:
            sys.exit(f"protoc failed on {a.schema_file}")
        with open(out, "rb") as f:
            files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)
    indexes = glue_message_indexes(pool.FindFileByName(name))
    version = client.get_or_register_schema_version(definition, a.topic, "PROTOBUF")
    for line in sys.stdin:
        if not line.strip():
            continue
        record = json.loads(line)
        cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(record["message"]))
        message = json_format.ParseDict(record["value"], cls(), ignore_unknown_fields=False)
        body = varint(indexes[record["message"]]) + message.SerializeToString()
        print(encode(body, version.version_id, compression=a.compress).hex())


if __name__ == "__main__":
    main()
