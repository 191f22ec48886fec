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
    p.add_argument("--format", choices=["avro", "json"], default="avro")
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


if __name__ == "__main__":
    main()
