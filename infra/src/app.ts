// The exactly-once functions on Lambda behind MSK triggers: the same system as
// ../template.yaml, as a CDK app. Which functions exist and what they read comes from
// ../functions.json, generated from the Rust crates (`eo functions --json`) and checked
// against them by tests/deploy.rs; nothing here repeats that list.
//
// Settings come from CDK context (cdk.json, or `-c key=value`); nothing is looked up
// in an AWS account, so `cdk synth` runs offline. Code comes from `artifactsDir`
// (default ../target/lambda): build it first with `cargo lambda build --release --arm64`.

import * as fs from "fs";
import * as path from "path";
import { App, CfnOutput, CustomResource, Duration, Stack, StackProps } from "aws-cdk-lib";
import * as ec2 from "aws-cdk-lib/aws-ec2";
import * as events from "aws-cdk-lib/aws-events";
import * as targets from "aws-cdk-lib/aws-events-targets";
import * as iam from "aws-cdk-lib/aws-iam";
import * as lambda from "aws-cdk-lib/aws-lambda";
import * as logs from "aws-cdk-lib/aws-logs";
import { Construct } from "constructs";

/** One entry of ../functions.json. */
interface FunctionDef {
  name: string;
  binary: string;
  topics: string[];
  outputTopics: string[];
}

interface Settings {
  mskClusterArn: string;
  vpcId: string;
  availabilityZones: string[];
  subnetIds: string[];
  securityGroupIds: string[];
  databaseSecretArn: string;
  clickhouseSecretArn: string;
  redisUrl: string;
  /** `standalone` or `cluster` (ElastiCache cluster mode, Serverless, Valkey Serverless). */
  redisMode: "standalone" | "cluster";
  /** Optional: a secret whose JSON `url` is the REDIS_URL with the AUTH token; "" for none. */
  redisSecretArn: string;
  clickhouseUrl: string;
  clickhouseUser: string;
  /** Optional: a schema registry with Confluent's REST API, for Avro values; "" for none. */
  schemaRegistryUrl: string;
  /** Optional: a secret whose JSON has the registry's `username` and `password`; "" for none. */
  schemaRegistrySecretArn: string;
  /**
   * Optional: the event source mapping validates values against a registry itself
   * (`none`, `confluent` or `glue`; AWS needs provisioned mode for it, which is used).
   */
  mskSchemaRegistry: "none" | "confluent" | "glue";
  /** With `confluent`, the registry's https URL; with `glue`, the Glue registry's ARN. */
  mskSchemaRegistryUri: string;
  /** With a registry on the mapping: `JSON` (values decoded by the mapping) or `SOURCE`. */
  mskEventRecordFormat: "JSON" | "SOURCE";
  consumerGroupPrefix: string;
  startingPosition: "TRIM_HORIZON" | "LATEST";
  batchSize: number;
  maxBatchingWindowSeconds: number;
  maxRetryAttempts: number;
  maxRecordAgeSeconds: number;
  bisectOnError: boolean;
  reportBatchItemFailures: boolean;
  minimumPollers: number;
  maximumPollers: number;
  architecture: "arm64" | "x86_64";
  memorySize: number;
  timeoutSeconds: number;
  logRetentionDays: number;
  outboxDrainSchedule: string;
  artifactsDir: string;
}

function settings(app: App): Settings {
  const get = (key: string) => {
    const v = app.node.tryGetContext(key);
    if (v === undefined) throw new Error(`missing CDK context value \`${key}\` (see infra/cdk.json)`);
    return v;
  };
  const keys: (keyof Settings)[] = [
    "mskClusterArn", "vpcId", "availabilityZones", "subnetIds", "securityGroupIds", "databaseSecretArn",
    "clickhouseSecretArn", "redisUrl", "redisMode", "redisSecretArn", "clickhouseUrl", "clickhouseUser", "schemaRegistryUrl", "schemaRegistrySecretArn",
    "mskSchemaRegistry", "mskSchemaRegistryUri", "mskEventRecordFormat", "consumerGroupPrefix", "startingPosition",
    "batchSize", "maxBatchingWindowSeconds", "maxRetryAttempts", "maxRecordAgeSeconds", "bisectOnError",
    "reportBatchItemFailures", "minimumPollers", "maximumPollers", "architecture", "memorySize", "timeoutSeconds", "logRetentionDays", "outboxDrainSchedule", "artifactsDir",
  ];
  const s = Object.fromEntries(keys.map((k) => [k, get(k)])) as unknown as Settings;
  // Values from `-c` arrive as strings.
  for (const k of ["batchSize", "maxBatchingWindowSeconds", "maxRetryAttempts", "maxRecordAgeSeconds", "minimumPollers", "maximumPollers", "memorySize", "timeoutSeconds", "logRetentionDays"] as const) {
    s[k] = Number(s[k]);
  }
  s.bisectOnError = String(s.bisectOnError) === "true";
  s.reportBatchItemFailures = String(s.reportBatchItemFailures) === "true";
  if (s.redisMode !== "standalone" && s.redisMode !== "cluster") {
    throw new Error(`redisMode must be standalone or cluster, not ${s.redisMode}`);
  }
  if (s.redisSecretArn !== "" && !/^arn:aws[a-z-]*:secretsmanager:/.test(s.redisSecretArn)) {
    throw new Error(`redisSecretArn is not a Secrets Manager ARN: ${s.redisSecretArn}`);
  }
  if (s.schemaRegistrySecretArn !== "" && !/^arn:aws[a-z-]*:secretsmanager:/.test(s.schemaRegistrySecretArn)) {
    throw new Error(`schemaRegistrySecretArn is not a Secrets Manager ARN: ${s.schemaRegistrySecretArn}`);
  }
  if (/^https?:\/\/[^/]*@/.test(s.schemaRegistryUrl)) {
    throw new Error("schemaRegistryUrl must not hold credentials: put them in schemaRegistrySecretArn");
  }
  if (!["none", "confluent", "glue"].includes(s.mskSchemaRegistry)) {
    throw new Error(`mskSchemaRegistry must be none, confluent or glue, not ${s.mskSchemaRegistry}`);
  }
  if (s.mskEventRecordFormat !== "JSON" && s.mskEventRecordFormat !== "SOURCE") {
    throw new Error(`mskEventRecordFormat must be JSON or SOURCE, not ${s.mskEventRecordFormat}`);
  }
  if (s.mskSchemaRegistry === "glue" && !GLUE_REGISTRY_ARN.test(s.mskSchemaRegistryUri)) {
    throw new Error(`mskSchemaRegistryUri is not a Glue registry ARN: ${s.mskSchemaRegistryUri}`);
  }
  if (s.mskSchemaRegistry === "confluent" && !/^https?:\/\/[^/@]+/.test(s.mskSchemaRegistryUri)) {
    throw new Error(`mskSchemaRegistryUri must be the registry's URL, without credentials: ${s.mskSchemaRegistryUri}`);
  }
  if (!/^arn:aws[a-z-]*:kafka:[a-z0-9-]+:\d{12}:cluster\/[^/]+\/[^/]+$/.test(s.mskClusterArn)) {
    throw new Error(`mskClusterArn is not an MSK cluster ARN: ${s.mskClusterArn}`);
  }
  return s;
}

/** arn:<partition>:glue:<region>:<account>:registry/<name> */
const GLUE_REGISTRY_ARN = /^arn:aws[a-z-]*:glue:[a-z0-9-]+:\d{12}:registry\/[^/]+$/;

/** The newest Postgres migration's version (the prefix of its file name in ../migrations). */
function migrationsVersion(): string {
  const versions = fs
    .readdirSync(path.join(__dirname, "..", "..", "migrations"))
    .map((f) => /^(\d+)_.*\.sql$/.exec(f)?.[1])
    .filter((v): v is string => v !== undefined)
    .sort();
  if (versions.length === 0) throw new Error("no migrations found in ../migrations");
  return versions[versions.length - 1];
}

/** arn:...:cluster/<name>/<uuid> -> arn:...:<kind>/<name>/<uuid>/<resource> */
function clusterResourceArn(clusterArn: string, kind: "topic" | "group", resource: string): string {
  const [prefix, cluster] = clusterArn.split(":cluster/");
  return `${prefix}:${kind}/${cluster}/${resource}`;
}

export class ExactlyOnceStack extends Stack {
  constructor(scope: Construct, id: string, functions: FunctionDef[], s: Settings, props?: StackProps) {
    super(scope, id, props);

    const vpc = ec2.Vpc.fromVpcAttributes(this, "Vpc", {
      vpcId: s.vpcId,
      availabilityZones: s.availabilityZones,
      privateSubnetIds: s.subnetIds,
    });
    const securityGroups = s.securityGroupIds.map((sg, i) => ec2.SecurityGroup.fromSecurityGroupId(this, `Sg${i}`, sg));

    const environment = {
      // Resolved by CloudFormation at deploy time: the template never holds a secret.
      DATABASE_URL: `{{resolve:secretsmanager:${s.databaseSecretArn}:SecretString:url}}`,
      // An AUTH token stays in Secrets Manager, resolved at deploy time like the others.
      REDIS_URL: s.redisSecretArn ? `{{resolve:secretsmanager:${s.redisSecretArn}:SecretString:url}}` : s.redisUrl,
      REDIS_MODE: s.redisMode,
      CLICKHOUSE_URL: s.clickhouseUrl,
      CLICKHOUSE_USER: s.clickhouseUser,
      CLICKHOUSE_PASSWORD: `{{resolve:secretsmanager:${s.clickhouseSecretArn}:SecretString:password}}`,
      SCHEMA_REGISTRY_URL: s.schemaRegistryUrl,
      // Basic auth stays in Secrets Manager, resolved at deploy time like the others.
      SCHEMA_REGISTRY_USERNAME: s.schemaRegistrySecretArn
        ? `{{resolve:secretsmanager:${s.schemaRegistrySecretArn}:SecretString:username}}`
        : "",
      SCHEMA_REGISTRY_PASSWORD: s.schemaRegistrySecretArn
        ? `{{resolve:secretsmanager:${s.schemaRegistrySecretArn}:SecretString:password}}`
        : "",
      MSK_CLUSTER_ARN: s.mskClusterArn,
      KAFKA_AUTH: "iam",
      // The function answers partial batch responses exactly when its mapping reads them.
      LAMBDA_REPORT_BATCH_ITEM_FAILURES: String(s.reportBatchItemFailures),
      // A record cannot tell a mapping's JSON from its SOURCE: the function is told.
      LAMBDA_EVENT_RECORD_FORMAT: s.mskSchemaRegistry === "none" ? "JSON" : s.mskEventRecordFormat,
      LOG_FORMAT: "json",
      RUST_LOG: "info",
    };

    // The deploy's migrate step: the functions only check the schema at init, so this
    // function applies it (Postgres migrations, every function's ClickHouse tables),
    // run through a custom resource before the functions are created or updated. Its
    // MigrationsVersion is the newest migration: a new one makes the next deploy run it.
    const migrateLogs = new logs.LogGroup(this, "migrate-logs", {
      logGroupName: `/aws/lambda/${this.stackName}-migrate`,
      retention: s.logRetentionDays as logs.RetentionDays,
    });
    const migrate = new lambda.Function(this, "migrate", {
      functionName: `${this.stackName}-migrate`,
      runtime: lambda.Runtime.PROVIDED_AL2023,
      handler: "bootstrap",
      architecture: s.architecture === "arm64" ? lambda.Architecture.ARM_64 : lambda.Architecture.X86_64,
      code: lambda.Code.fromAsset(path.resolve(s.artifactsDir, "migrate")),
      memorySize: s.memorySize,
      timeout: Duration.seconds(300),
      vpc,
      vpcSubnets: { subnets: vpc.privateSubnets },
      securityGroups,
      logGroup: migrateLogs,
      loggingFormat: lambda.LoggingFormat.JSON,
      environment,
    });
    const migrations = new CustomResource(this, "Migrations", {
      serviceToken: migrate.functionArn,
      resourceType: "Custom::Migrations",
      properties: { MigrationsVersion: migrationsVersion() },
    });

    for (const f of functions) {
      const logGroup = new logs.LogGroup(this, `${f.name}-logs`, {
        logGroupName: `/aws/lambda/${this.stackName}-${f.name}`,
        retention: s.logRetentionDays as logs.RetentionDays,
      });
      const group = `${s.consumerGroupPrefix}-${f.name}`;

      // Least privilege: this cluster, this function's topics and group, nothing else.
      const role = new iam.Role(this, `${f.name}-role`, {
        assumedBy: new iam.ServicePrincipal("lambda.amazonaws.com"),
        managedPolicies: [iam.ManagedPolicy.fromAwsManagedPolicyName("service-role/AWSLambdaVPCAccessExecutionRole")],
      });
      role.addToPolicy(new iam.PolicyStatement({ actions: ["kafka:DescribeClusterV2", "kafka:GetBootstrapBrokers"], resources: [s.mskClusterArn] }));
      role.addToPolicy(new iam.PolicyStatement({
        actions: ["kafka-cluster:Connect", "kafka-cluster:DescribeClusterDynamicConfiguration",
          ...(f.outputTopics.length ? ["kafka-cluster:WriteDataIdempotently"] : [])],
        resources: [s.mskClusterArn],
      }));
      role.addToPolicy(new iam.PolicyStatement({
        actions: ["kafka-cluster:DescribeTopic", "kafka-cluster:ReadData"],
        resources: f.topics.map((t) => clusterResourceArn(s.mskClusterArn, "topic", t)),
      }));
      if (f.outputTopics.length) {
        role.addToPolicy(new iam.PolicyStatement({
          actions: ["kafka-cluster:DescribeTopic", "kafka-cluster:WriteData"],
          resources: f.outputTopics.map((t) => clusterResourceArn(s.mskClusterArn, "topic", t)),
        }));
      }
      role.addToPolicy(new iam.PolicyStatement({
        actions: ["kafka-cluster:DescribeGroup", "kafka-cluster:AlterGroup"],
        resources: [clusterResourceArn(s.mskClusterArn, "group", group)],
      }));
      role.addToPolicy(new iam.PolicyStatement({ actions: ["logs:CreateLogStream", "logs:PutLogEvents"], resources: [logGroup.logGroupArn] }));
      // A registry on the mapping is read with the function's role.
      if (s.mskSchemaRegistry === "glue") {
        const [prefix, name] = s.mskSchemaRegistryUri.split(":registry/");
        role.addToPolicy(new iam.PolicyStatement({
          actions: ["glue:GetRegistry", "glue:GetSchemaVersion"],
          resources: [s.mskSchemaRegistryUri, `${prefix}:schema/${name}/*`],
        }));
      } else if (s.mskSchemaRegistry === "confluent" && s.schemaRegistrySecretArn) {
        role.addToPolicy(new iam.PolicyStatement({ actions: ["secretsmanager:GetSecretValue"], resources: [s.schemaRegistrySecretArn] }));
      }

      const fn = new lambda.Function(this, f.name, {
        functionName: `${this.stackName}-${f.name}`,
        runtime: lambda.Runtime.PROVIDED_AL2023,
        handler: "bootstrap",
        architecture: s.architecture === "arm64" ? lambda.Architecture.ARM_64 : lambda.Architecture.X86_64,
        code: lambda.Code.fromAsset(path.resolve(s.artifactsDir, f.binary)),
        memorySize: s.memorySize,
        timeout: Duration.seconds(s.timeoutSeconds),
        role,
        vpc,
        vpcSubnets: { subnets: vpc.privateSubnets },
        securityGroups,
        logGroup,
        loggingFormat: lambda.LoggingFormat.JSON,
        environment,
      });

      // The MSK trigger, with the same error handling as template.yaml: by default it
      // retries a failed batch until it succeeds and never discards a record (poison is
      // dead-lettered by the guard; what is retried is blocked by an outage). The
      // error-handling settings need provisioned mode.
      const mapping = new lambda.CfnEventSourceMapping(this, `${f.name}-msk`, {
        functionName: fn.functionName,
        eventSourceArn: s.mskClusterArn,
        topics: f.topics,
        amazonManagedKafkaEventSourceConfig: {
          consumerGroupId: group,
          schemaRegistryConfig: s.mskSchemaRegistry === "none" ? undefined : {
            schemaRegistryUri: s.mskSchemaRegistryUri,
            eventRecordFormat: s.mskEventRecordFormat,
            accessConfigs: s.mskSchemaRegistry === "confluent" && s.schemaRegistrySecretArn
              ? [{ type: "BASIC_AUTH", uri: s.schemaRegistrySecretArn }]
              : undefined,
            schemaValidationConfigs: [{ attribute: "VALUE" }],
          },
        },
        startingPosition: s.startingPosition,
        batchSize: s.batchSize,
        maximumBatchingWindowInSeconds: s.maxBatchingWindowSeconds,
        maximumRetryAttempts: s.maxRetryAttempts,
        maximumRecordAgeInSeconds: s.maxRecordAgeSeconds,
        bisectBatchOnFunctionError: s.bisectOnError,
        functionResponseTypes: s.reportBatchItemFailures ? ["ReportBatchItemFailures"] : undefined,
        provisionedPollerConfig: { minimumPollers: s.minimumPollers, maximumPollers: s.maximumPollers },
      });
      mapping.node.addDependency(role);
      // Its init checks the schema the migrate step applies.
      fn.node.addDependency(migrations);

      // A function that publishes drains its outbox after each invocation that processed
      // events, which only happens while records arrive: messages queued during a Kafka
      // outage would wait for the next record on its topic. This rule's "Scheduled
      // Event" makes the function drain the outbox and prune published messages.
      if (f.outputTopics.length) {
        new events.Rule(this, `${f.name}-outbox-drain`, {
          description: `Drains the ${f.name} function's outbox without new traffic`,
          schedule: events.Schedule.expression(s.outboxDrainSchedule),
          targets: [new targets.LambdaFunction(fn)],
        });
      }

      new CfnOutput(this, `${f.name}-arn`, { value: fn.functionArn });
    }
  }
}

const app = new App();
const functions: FunctionDef[] = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "functions.json"), "utf8"));
new ExactlyOnceStack(app, app.node.tryGetContext("stackName") ?? "ExactlyOnce", functions, settings(app));
app.synth();
