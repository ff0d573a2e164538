// Test harness: starts the real Python server on a free loopback port, waits until
// grpc.health.v1.Health reports mlserving.v1.InferenceService SERVING, and stops it after.
import { type ChildProcess, spawn } from "node:child_process";
import { createServer } from "node:net";
import { resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

import { BinaryReader, BinaryWriter } from "@bufbuild/protobuf/wire";
import { Client, credentials } from "@grpc/grpc-js";

import { SERVICE_NAME } from "../src/index";

/** The repository root: this file runs from clients/typescript/dist/test/. */
export const REPO_ROOT = process.env["ML_SERVING_REPO"] ?? resolve(__dirname, "..", "..", "..", "..");

const STARTUP_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 15_000;
const SERVING = 1; // grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING

/** Environment the server must not inherit: the tests expect the offline LLM route and "v1". */
const SCRUBBED_ENV = ["ML_SERVING_LLM_CONFIG", "ML_SERVING_LLM_MODEL", "DEFAULT_PROMPT_VERSION", "ML_SERVING_MODEL_ROOT"];

export interface RunningServer {
  address: string;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const address = probe.address();
      const port = typeof address === "object" && address ? address.port : 0;
      probe.close(() => resolvePort(port));
    });
  });
}

/** grpc.health.v1.Health/Check, hand-encoded: the health proto is not part of protos/. */
export function healthCheck(address: string, service: string, timeoutMs = 1_000): Promise<number> {
  const client = new Client(address, credentials.createInsecure());
  return new Promise<number>((resolveStatus, reject) => {
    client.makeUnaryRequest(
      "/grpc.health.v1.Health/Check",
      (req: string) => Buffer.from(new BinaryWriter().uint32(10).string(req).finish()),
      (buf: Buffer) => {
        const reader = new BinaryReader(buf);
        let status = 0;
        while (reader.pos < reader.len) {
          const tag = reader.uint32();
          if (tag >>> 3 === 1) status = reader.int32();
          else reader.skip(tag & 7);
        }
        return status;
      },
      service,
      { deadline: new Date(Date.now() + timeoutMs) },
      (err, status) => (err ? reject(err) : resolveStatus(status ?? 0)),
    );
  }).finally(() => client.close());
}

/** Starts `<repo>/.venv/bin/python -m ml_serving` and resolves once its service is SERVING. */
export async function startServer(): Promise<RunningServer> {
  const port = await freePort();
  const address = `127.0.0.1:${port}`;
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    ML_SERVING_HOST: "127.0.0.1",
    ML_SERVING_PORT: String(port),
    ML_SERVING_METRICS_PORT: "0",
    ML_SERVING_SHUTDOWN_GRACE_S: "2",
    ML_SERVING_LOG_JSON: "false",
  };
  for (const name of SCRUBBED_ENV) delete env[name];
  const python = process.env["ML_SERVING_PYTHON"] ?? resolve(REPO_ROOT, ".venv", "bin", "python");
  const child = spawn(python, ["-m", "ml_serving"], { cwd: REPO_ROOT, env, stdio: ["ignore", "pipe", "pipe"] });

  let log = "";
  const keep = (chunk: Buffer) => {
    log = (log + chunk.toString()).slice(-8_000);
  };
  child.stdout?.on("data", keep);
  child.stderr?.on("data", keep);
  let exited: string | null = null;
  const exit = new Promise<void>((done) => {
    child.once("exit", (code, signal) => {
      exited = `exited with ${signal ?? code}`;
      done();
    });
    child.once("error", (err) => {
      exited = `failed to start: ${err.message}`;
      done();
    });
  });
  const killOnExit = () => child.kill("SIGKILL");
  process.once("exit", killOnExit);

  const stop = async () => {
    process.removeListener("exit", killOnExit);
    if (exited !== null) return;
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
    await exit;
    clearTimeout(timer);
  };

  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  let last = "no answer yet";
  while (Date.now() < deadline) {
    if (exited !== null) {
      throw new Error(`server ${exited} before it was SERVING (${python} -m ml_serving); its log:\n${log}`);
    }
    try {
      const status = await healthCheck(address, SERVICE_NAME);
      if (status === SERVING) return { address, stop };
      last = `health status ${status}`;
    } catch (err) {
      last = (err as Error).message;
    }
    await sleep(250);
  }
  await stop();
  throw new Error(`server at ${address} not SERVING within ${STARTUP_TIMEOUT_MS} ms (${last}); its log:\n${log}`);
}
