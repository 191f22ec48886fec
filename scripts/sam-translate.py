"""Expands template.yaml's SAM transform offline and prints the plain CloudFormation.

cfn-lint checks a SAM template's own schema, but the properties SAM copies into the
resources it generates (an MSK event's FunctionResponseTypes, ProvisionedPollerConfig,
...) are only checked once they stand in an AWS::Lambda::EventSourceMapping: so
scripts/infra-check.sh lints this output too. Usage: sam-translate.py TEMPLATE > OUT.json
"""
import json
import os
import sys

from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse


class NoManagedPolicies:
    """The translator asks IAM for managed policy ARNs only for `Policies:` shorthands,
    which the template does not use; offline, there is nothing to look up."""

    def load(self):
        return {}


os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
template = yaml_parse(open(sys.argv[1]).read())
# `sam build` replaces the local CodeUri with the built artifact; the translator wants S3.
template.setdefault("Globals", {}).setdefault("Function", {})["CodeUri"] = "s3://bucket/key"
json.dump(transform(template, {}, NoManagedPolicies()), sys.stdout, indent=1, default=str)
