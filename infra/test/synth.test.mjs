// Checks the synthesized CloudFormation (cdk.out) against ../functions.json: one
// function per crate, an MSK trigger per function with its topics and group, error
// handling, and no wildcard IAM on kafka-cluster actions.
import assert from "node:assert/strict";
import fs from "node:fs";
import test from "node:test";

const functions = JSON.parse(fs.readFileSync(new URL("../functions.json", import.meta.url), "utf8"));
const template = JSON.parse(fs.readFileSync(new URL("../cdk.out/ExactlyOnce.template.json", import.meta.url), "utf8"));
const context = JSON.parse(fs.readFileSync(new URL("../cdk.json", import.meta.url), "utf8")).context;
const resources = Object.entries(template.Resources);
const ofType = (type) => resources.filter(([, r]) => r.Type === type);
const json = (v) => JSON.stringify(v);

test("one Lambda function per function crate, and the migrate step", () => {
  const lambdas = ofType("AWS::Lambda::Function");
  assert.equal(lambdas.length, functions.length + 1);
  for (const f of functions) {
    const found = lambdas.find(([, r]) => json(r.Properties.FunctionName).includes(`-${f.name}`));
    assert.ok(found, `no Lambda function for ${f.name}`);
    const [, fn] = found;
    assert.equal(fn.Properties.Runtime, "provided.al2023");
    assert.equal(fn.Properties.Handler, "bootstrap");
    assert.deepEqual(fn.Properties.Architectures, ["arm64"]);
    assert.ok(fn.Properties.VpcConfig.SubnetIds.length > 0, `${f.name} runs in the VPC`);
  }
});

test("an MSK event source mapping per function, with its topics, group and error handling", () => {
  const mappings = ofType("AWS::Lambda::EventSourceMapping").map(([, r]) => r.Properties);
  assert.equal(mappings.length, functions.length);
  for (const f of functions) {
    const m = mappings.find((m) => m.AmazonManagedKafkaEventSourceConfig.ConsumerGroupId === `${context.consumerGroupPrefix}-${f.name}`);
    assert.ok(m, `no MSK trigger for ${f.name}`);
    assert.deepEqual(m.Topics, f.topics);
    assert.equal(m.EventSourceArn, context.mskClusterArn);
    assert.equal(m.StartingPosition, context.startingPosition);
    assert.equal(m.BatchSize, context.batchSize);
    assert.equal(m.MaximumRetryAttempts, -1, `${f.name}: retries until the batch succeeds`);
    assert.equal(m.MaximumRecordAgeInSeconds, -1, `${f.name}: no record ages out`);
    assert.equal(m.DestinationConfig, undefined, `${f.name}: nothing is discarded to a destination`);
    assert.deepEqual(m.FunctionResponseTypes, ["ReportBatchItemFailures"]);
    assert.ok(m.ProvisionedPollerConfig.MinimumPollers >= 1, `${f.name}: provisioned mode (error handling needs it)`);
    assert.ok(m.ProvisionedPollerConfig.MaximumPollers >= m.ProvisionedPollerConfig.MinimumPollers);
  }
});

test("no wildcard IAM on kafka-cluster actions; each role reaches only its topics and group", () => {
  const policies = ofType("AWS::IAM::Policy").map(([, r]) => r.Properties.PolicyDocument.Statement).flat();
  const kafka = policies.filter((s) => [s.Action].flat().some((a) => a.startsWith("kafka-cluster:") || a.startsWith("kafka:")));
  assert.ok(kafka.length > 0);
  for (const s of kafka) {
    for (const r of [s.Resource].flat()) {
      assert.ok(!json(r).includes("*"), `wildcard resource on ${json(s.Action)}: ${json(r)}`);
    }
    assert.ok(![s.Action].flat().some((a) => a.endsWith(":*")), `wildcard action ${json(s.Action)}`);
  }
  for (const f of functions) {
    for (const t of f.topics) {
      assert.ok(kafka.some((s) => [s.Action].flat().includes("kafka-cluster:ReadData") && json(s.Resource).endsWith(`/${t}"`)), `read ${t}`);
    }
    for (const t of f.outputTopics) {
      assert.ok(kafka.some((s) => [s.Action].flat().includes("kafka-cluster:WriteData") && json(s.Resource).endsWith(`/${t}"`)), `write ${t}`);
    }
  }
  const writers = kafka.filter((s) => [s.Action].flat().includes("kafka-cluster:WriteData"));
  assert.equal(writers.length, functions.filter((f) => f.outputTopics.length).length, "only publishing functions may write");
});

test("secrets are references, never literals", () => {
  for (const [, fn] of ofType("AWS::Lambda::Function")) {
    const env = fn.Properties.Environment.Variables;
    assert.match(json(env.DATABASE_URL), /resolve:secretsmanager/);
    assert.match(json(env.CLICKHOUSE_PASSWORD), /resolve:secretsmanager/);
    assert.equal(env.LAMBDA_REPORT_BATCH_ITEM_FAILURES, "true", "the function answers in the shape its mapping reads");
  }
});

test("the migrate step runs before the functions, at the newest migration", () => {
  const migrations = ofType("Custom::Migrations");
  assert.equal(migrations.length, 1);
  const [id, resource] = migrations[0];
  const newest = fs
    .readdirSync(new URL("../../migrations/", import.meta.url))
    .map((f) => /^(\d+)_.*\.sql$/.exec(f)?.[1])
    .filter(Boolean)
    .sort()
    .at(-1);
  assert.equal(resource.Properties.MigrationsVersion, newest);
  for (const [, fn] of ofType("AWS::Lambda::Function")) {
    if (json(fn.Properties.FunctionName).includes("-migrate")) continue;
    assert.ok([fn.DependsOn].flat().includes(id), `${json(fn.Properties.FunctionName)} depends on the migrate step`);
  }
});

test("a schedule drains the outbox of each function that publishes, and of no other", () => {
  const rules = ofType("AWS::Events::Rule").map(([, r]) => r.Properties);
  const publishing = functions.filter((f) => f.outputTopics.length);
  assert.equal(rules.length, publishing.length);
  const lambdas = ofType("AWS::Lambda::Function");
  for (const f of publishing) {
    const [id] = lambdas.find(([, r]) => json(r.Properties.FunctionName).includes(`-${f.name}"`));
    const rule = rules.find((r) => r.Targets.some((t) => json(t.Arn).includes(`"${id}"`)));
    assert.ok(rule, `no schedule invokes ${f.name}`);
    assert.equal(rule.ScheduleExpression, context.outboxDrainSchedule);
    assert.equal(rule.State, "ENABLED");
    assert.ok(rule.Targets.every((t) => t.Input === undefined), `${f.name} reads the scheduled event itself`);
    const permission = ofType("AWS::Lambda::Permission").find(([, p]) => json(p.Properties.FunctionName).includes(`"${id}"`) && p.Properties.Principal === "events.amazonaws.com");
    assert.ok(permission, `EventBridge may invoke ${f.name}`);
  }
});

test("Redis mode and address reach every function, with no secret in the template", () => {
  let checked = 0;
  for (const [, fn] of ofType("AWS::Lambda::Function")) {
    const vars = fn.Properties.Environment?.Variables ?? {};
    if (!("REDIS_URL" in vars)) continue;
    checked += 1;
    assert.equal(vars.REDIS_MODE, context.redisMode);
    if (context.redisSecretArn === "") {
      assert.equal(vars.REDIS_URL, context.redisUrl);
    } else {
      assert.ok(json(vars.REDIS_URL).includes("resolve:secretsmanager"), "the AUTH token is resolved at deploy time");
    }
  }
  assert.ok(checked >= functions.length, `only ${checked} functions carry REDIS_URL`);
});

test("the schema registry's address reaches every function, its credentials only by reference", () => {
  let checked = 0;
  for (const [, fn] of ofType("AWS::Lambda::Function")) {
    const vars = fn.Properties.Environment?.Variables ?? {};
    if (!("REDIS_URL" in vars)) continue;
    checked += 1;
    assert.equal(vars.SCHEMA_REGISTRY_URL, context.schemaRegistryUrl);
    for (const v of ["SCHEMA_REGISTRY_USERNAME", "SCHEMA_REGISTRY_PASSWORD"]) {
      if (context.schemaRegistrySecretArn === "") {
        assert.equal(vars[v], "", v);
      } else {
        assert.ok(json(vars[v]).includes("resolve:secretsmanager"), `${v} is resolved at deploy time`);
      }
    }
  }
  assert.ok(checked >= functions.length, `only ${checked} functions carry the registry's address`);
});

// The same app synthesized with a registry on the mappings (package.json's test script):
// a Glue registry (JSON records), and a Confluent one with basic auth and SOURCE records.
const synthesized = (dir) => JSON.parse(fs.readFileSync(new URL(`../${dir}/ExactlyOnce.template.json`, import.meta.url), "utf8"));
const of = (t, type) => Object.values(t.Resources).filter((r) => r.Type === type);
const statements = (t) => of(t, "AWS::IAM::Policy").map((r) => r.Properties.PolicyDocument.Statement).flat();
const recordFormat = (t) => of(t, "AWS::Lambda::Function").map((f) => f.Properties.Environment?.Variables?.LAMBDA_EVENT_RECORD_FORMAT);

test("no registry on the mappings by default: the functions decode framed values themselves", () => {
  for (const [, m] of ofType("AWS::Lambda::EventSourceMapping")) {
    assert.equal(m.Properties.AmazonManagedKafkaEventSourceConfig.SchemaRegistryConfig, undefined);
  }
  assert.ok(recordFormat(template).every((f) => f === "JSON"));
  assert.ok(!json(statements(template)).includes("glue:"), "no Glue access without a Glue registry");
});

test("a Glue registry on every mapping, readable by each function's role", () => {
  const t = synthesized("cdk.out.glue");
  const registry = "arn:aws:glue:us-east-1:111122223333:registry/orders";
  const mappings = of(t, "AWS::Lambda::EventSourceMapping");
  assert.equal(mappings.length, functions.length);
  for (const m of mappings) {
    assert.deepEqual(m.Properties.AmazonManagedKafkaEventSourceConfig.SchemaRegistryConfig, {
      SchemaRegistryURI: registry,
      EventRecordFormat: "JSON",
      SchemaValidationConfigs: [{ Attribute: "VALUE" }],
    });
  }
  const glue = statements(t).filter((s) => [s.Action].flat().includes("glue:GetSchemaVersion"));
  assert.equal(glue.length, functions.length, "one grant per function role");
  for (const s of glue) {
    assert.deepEqual(s.Resource, [registry, "arn:aws:glue:us-east-1:111122223333:schema/orders/*"]);
  }
  assert.ok(recordFormat(t).every((f) => f === "JSON"));
});

test("a Confluent registry on every mapping with basic auth from the secret, SOURCE told to the functions", () => {
  const t = synthesized("cdk.out.confluent");
  const secret = "arn:aws:secretsmanager:us-east-1:111122223333:secret:registry-AbCdEf";
  for (const m of of(t, "AWS::Lambda::EventSourceMapping")) {
    const r = m.Properties.AmazonManagedKafkaEventSourceConfig.SchemaRegistryConfig;
    assert.equal(r.SchemaRegistryURI, "https://registry.example:8081");
    assert.equal(r.EventRecordFormat, "SOURCE");
    assert.deepEqual(r.AccessConfigs, [{ Type: "BASIC_AUTH", URI: secret }]);
  }
  const reads = statements(t).filter((s) => [s.Action].flat().includes("secretsmanager:GetSecretValue"));
  assert.equal(reads.length, functions.length);
  assert.ok(reads.every((s) => s.Resource === secret));
  assert.ok(!json(statements(t)).includes("glue:"));
  assert.ok(recordFormat(t).every((f) => f === "SOURCE"));
});

test("a Glue registry delivering SOURCE: the functions are told, and may fetch the schema versions themselves", async () => {
  const { execFileSync } = await import("node:child_process");
  execFileSync("npx", ["cdk", "synth", "--quiet", "-o", "cdk.out.gluesource", "-c", "artifactsDir=test/.artifacts", "-c", "mskSchemaRegistry=glue",
    "-c", "mskSchemaRegistryUri=arn:aws:glue:us-east-1:111122223333:registry/orders", "-c", "mskEventRecordFormat=SOURCE"],
    { cwd: new URL("..", import.meta.url), stdio: "pipe" });
  const t = synthesized("cdk.out.gluesource");
  const mappings = of(t, "AWS::Lambda::EventSourceMapping");
  assert.equal(mappings.length, functions.length);
  assert.ok(mappings.every((m) => m.Properties.AmazonManagedKafkaEventSourceConfig.SchemaRegistryConfig.EventRecordFormat === "SOURCE"));
  assert.ok(recordFormat(t).every((f) => f === "SOURCE"));
  const glue = statements(t).filter((s) => [s.Action].flat().includes("glue:GetSchemaVersion"));
  assert.equal(glue.length, functions.length, "each function role may call GetSchemaVersion");
});
