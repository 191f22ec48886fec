#!/usr/bin/env bash
# Validates the deployment descriptions offline: cfn-lint and `sam validate --lint` on
# template.yaml (SAM transform included), and `cdk synth` of infra/ with its checks
# (infra/test/synth.test.mjs). Installs pinned tools on first use (a virtualenv under
# $EO_STATE_DIR; npm packages from infra/package-lock.json). Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR="${EO_STATE_DIR:-$HOME/.local/state/exactly-once}"
VENV="$STATE_DIR/venv"
CFN_LINT_VERSION=1.58.0
SAM_CLI_VERSION=1.170.0
export SAM_CLI_TELEMETRY=0

log() { printf '[infra] %s\n' "$*"; }

if ! "$VENV/bin/cfn-lint" --version 2>/dev/null | grep -q "$CFN_LINT_VERSION" \
   || ! "$VENV/bin/sam" --version 2>/dev/null | grep -q "$SAM_CLI_VERSION"; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    log "installing python3-venv"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  log "installing cfn-lint $CFN_LINT_VERSION and aws-sam-cli $SAM_CLI_VERSION into $VENV (once)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "cfn-lint==$CFN_LINT_VERSION" "aws-sam-cli==$SAM_CLI_VERSION"
fi

log "cfn-lint template.yaml"
"$VENV/bin/cfn-lint" template.yaml
# SAM copies the MSK events' properties into AWS::Lambda::EventSourceMapping resources;
# only there does cfn-lint check them (names, allowed values).
log "cfn-lint on the SAM-expanded template"
EXPANDED=$(mktemp --suffix=.json)
"$VENV/bin/python" scripts/sam-translate.py template.yaml >"$EXPANDED"
"$VENV/bin/cfn-lint" "$EXPANDED"
rm -f "$EXPANDED"
log "sam validate --lint"
"$VENV/bin/sam" validate --lint --template template.yaml --region us-east-1 >/dev/null
log "template.yaml is valid"

if ! command -v npm >/dev/null; then
  log "installing nodejs and npm"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
CDK_LOG=$(mktemp)
log "cdk synth (infra/) and its checks"
(cd infra && npm ci --no-audit --no-fund --loglevel=error >/dev/null && npm test --silent >"$CDK_LOG" 2>&1) || {
  cat "$CDK_LOG" >&2
  exit 1
}
grep -E "^# (pass|fail)" "$CDK_LOG" | sed 's/^/[infra] cdk checks: /'

