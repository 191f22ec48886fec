#!/usr/bin/env bash
# Installs the third-party Kafka clients the payload tests produce with: Confluent's
# Python client (its Avro, JSON Schema and Protobuf serializers frame records for a
# schema registry), fastavro, Google's protobuf runtime, and the AWS Glue Schema
# Registry's Python serializer (aws-glue-schema-registry, over boto3's Glue client),
# and Google's protoc (grpcio-tools: the Glue Protobuf tests compile their .proto with it),
# pinned, into a virtualenv of their own under $EO_STATE_DIR (once). Prints the path of
# the virtualenv's python on stdout; the tests read it from EO_PYTHON (scripts/test.sh
# exports it) or find it at the same default path. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR="${EO_STATE_DIR:-$HOME/.local/state/exactly-once}"
VENV="$STATE_DIR/pyclients"
# 2.x wheels bundle librdkafka: nothing to build. [avro,json,protobuf] bring the registry
# client, protobuf for Protobuf,
# fastavro for Avro and jsonschema for JSON Schema.
PACKAGES=("confluent-kafka[avro,json,protobuf]==2.16.1" "fastavro==1.13.1" "protobuf==7.36.2"
  "aws-glue-schema-registry==1.1.3" "boto3==1.44.18" "grpcio-tools==1.85.4")
STAMP="$VENV/.installed"

log() { printf '[pyclients] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    log "installing python3-venv"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  log "installing ${PACKAGES[*]} into $VENV (once)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}" >&2
  printf '%s' "${PACKAGES[*]}" >"$STAMP"
fi
# Fails here, naming the package, rather than in a test.
"$VENV/bin/python" -c 'import confluent_kafka, confluent_kafka.schema_registry.avro, confluent_kafka.schema_registry.json_schema, confluent_kafka.schema_registry.protobuf, fastavro, google.protobuf, aws_schema_registry, boto3, grpc_tools.protoc' >&2
echo "$VENV/bin/python"
