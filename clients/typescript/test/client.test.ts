// Client behaviour against an in-process grpc-js fake of the service: which RPCs are retried,
// deadlines, request ids, cancellation. No Python server needed.
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, it } from "node:test";

import {
  Server,
  ServerCredentials,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceError,
  type sendUnaryData,
} from "@grpc/grpc-js";

import {
  type GenerateRequest,
  type GenerateResponse,
  type GenerateStreamRequest,
  type GenerateStreamResponse,
  InferenceClient,
  type InferenceServiceServer,
  InferenceServiceService,
  type ListPromptVersionsRequest,
  type ListPromptVersionsResponse,
  Metadata,
  type ScoreRequest,
  type ScoreResponse,
  isServiceError,
  status,
} from "../src/index";

interface Seen {
  attempts: number;
  deadlineMs: number[];
  requestIds: string[];
}

/** What the fake answers: a list of status codes to fail with first, then success. */
const script: Record<string, number[]> = {};
const seen: Record<string, Seen> = {};
let scoreDelayMs = 0;

function record(method: string, call: ServerUnaryCall<unknown, unknown> | ServerWritableStream<unknown, unknown>) {
  const s = (seen[method] ??= { attempts: 0, deadlineMs: [], requestIds: [] });
  s.attempts += 1;
  const deadline = call.getDeadline();
  s.deadlineMs.push(deadline instanceof Date ? deadline.getTime() - Date.now() : Number(deadline) - Date.now());
  const id = call.metadata.get("x-request-id")[0];
  if (id !== undefined) s.requestIds.push(String(id));
  const code = script[method]?.shift();
  return code === undefined ? null : ({ code, details: `fake ${method} failure`, name: "", message: "" } as Partial<ServiceError>);
}

const fake: InferenceServiceServer = {
  score(call: ServerUnaryCall<ScoreRequest, ScoreResponse>, callback: sendUnaryData<ScoreResponse>) {
    const failure = record("score", call);
    if (failure) return callback(failure);
    const answer = () =>
      callback(null, {
        scores: call.request.candidates.map((c) => ({ id: c.id, score: 0.5 })),
        modelName: "fake",
        modelVersion: "1",
        candidateIds: [],
        candidateScores: [],
        defaultedFeatures: 0,
      });
    if (scoreDelayMs > 0) setTimeout(answer, scoreDelayMs);
    else answer();
  },
  generate(call: ServerUnaryCall<GenerateRequest, GenerateResponse>, callback: sendUnaryData<GenerateResponse>) {
    const failure = record("generate", call);
    if (failure) return callback(failure);
    callback(null, {
      text: "tip",
      promptVersion: call.request.promptVersion || "v1",
      promptHash: "h",
      model: "fake",
      usage: undefined,
      finishReason: 1,
      fallback: false,
      decisionId: "d1",
      assignment: undefined,
    });
  },
  generateStream(call: ServerWritableStream<GenerateStreamRequest, GenerateStreamResponse>) {
    const failure = record("generateStream", call);
    if (failure) {
      call.emit("error", failure);
      return;
    }
    for (const word of ["one", " two", " three"]) call.write({ event: { $case: "textDelta", value: word } });
    call.write({
      event: {
        $case: "end",
        value: {
          promptVersion: "v1",
          promptHash: "h",
          model: "fake",
          usage: { promptTokens: 1, completionTokens: 3, totalTokens: 4 },
          finishReason: 1,
          fallback: false,
          decisionId: "d1",
          assignment: undefined,
        },
      },
    });
    call.end();
  },
  listPromptVersions(
    call: ServerUnaryCall<ListPromptVersionsRequest, ListPromptVersionsResponse>,
    callback: sendUnaryData<ListPromptVersionsResponse>,
  ) {
    record("listPromptVersions", call);
    callback(null, { versions: [], defaultVersion: "v1" });
  },
};

const candidates = [{ id: "a", values: [1] }, { id: "b", values: [2] }];

describe("InferenceClient against a fake server", () => {
  const server = new Server();
  let client: InferenceClient;

  before(async () => {
    server.addService(InferenceServiceService, fake);
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    client = new InferenceClient(`127.0.0.1:${port}`, { deadlinesMs: { generate: 7_000 } });
  });

  after(() => {
    client.close();
    server.forceShutdown();
  });

  beforeEach(() => {
    for (const k of Object.keys(script)) delete script[k];
    for (const k of Object.keys(seen)) delete seen[k];
    scoreDelayMs = 0;
  });

  it("retries Score on UNAVAILABLE and succeeds on the third attempt", async () => {
    script["score"] = [status.UNAVAILABLE, status.UNAVAILABLE];
    const res = await client.score({ userId: "u", candidates });
    assert.deepEqual(res.scores.map((s) => s.id), ["a", "b"]);
    assert.equal(seen["score"]!.attempts, 3);
  });

  it("gives Score up after 3 attempts", async () => {
    script["score"] = [status.UNAVAILABLE, status.UNAVAILABLE, status.UNAVAILABLE, status.UNAVAILABLE];
    await assert.rejects(client.score({ candidates }), { code: status.UNAVAILABLE });
    assert.equal(seen["score"]!.attempts, 3);
  });

  it("does not retry Score on other codes", async () => {
    script["score"] = [status.RESOURCE_EXHAUSTED];
    await assert.rejects(client.score({ candidates }), { code: status.RESOURCE_EXHAUSTED });
    assert.equal(seen["score"]!.attempts, 1);
  });

  it("never retries Generate", async () => {
    script["generate"] = [status.UNAVAILABLE];
    await assert.rejects(client.generate({ promptVersion: "v1" }), (err: unknown) => {
      assert.ok(isServiceError(err));
      assert.equal(err.code, status.UNAVAILABLE);
      assert.equal(err.details, "fake generate failure");
      return true;
    });
    assert.equal(seen["generate"]!.attempts, 1);
  });

  it("never retries GenerateStream", async () => {
    script["generateStream"] = [status.UNAVAILABLE];
    await assert.rejects(
      (async () => {
        for await (const _ of client.generateStream({})) assert.fail("no message expected");
      })(),
      { code: status.UNAVAILABLE },
    );
    assert.equal(seen["generateStream"]!.attempts, 1);
  });

  it("streams deltas then the end totals", async () => {
    const events: GenerateStreamResponse[] = [];
    for await (const e of client.generateStream({ context: { topic: "sleep" } })) events.push(e);
    assert.deepEqual(
      events.map((e) => e.event?.$case),
      ["textDelta", "textDelta", "textDelta", "end"],
    );
  });

  it("puts a deadline on every call: the per-method default or the per-call one", async () => {
    await client.score({ candidates });
    await client.score({ candidates }, { timeoutMs: 300 });
    await client.generate({});
    await client.listPromptVersions();
    const [scoreDefault, scoreShort] = seen["score"]!.deadlineMs;
    assert.ok(scoreDefault! > 1_000 && scoreDefault! <= 2_000, `score default deadline ${scoreDefault}`);
    assert.ok(scoreShort! > 0 && scoreShort! <= 300, `score per-call deadline ${scoreShort}`);
    const generateDeadline = seen["generate"]!.deadlineMs[0]!;
    assert.ok(generateDeadline > 6_000 && generateDeadline <= 7_000, `generate deadline ${generateDeadline}`);
    const listDeadline = seen["listPromptVersions"]!.deadlineMs[0]!;
    assert.ok(listDeadline > 4_000 && listDeadline <= 5_000, `list deadline ${listDeadline}`);
  });

  it("fails with DEADLINE_EXCEEDED when the deadline passes", async () => {
    scoreDelayMs = 500;
    await assert.rejects(client.score({ candidates }, { timeoutMs: 50 }), { code: status.DEADLINE_EXCEEDED });
    await assert.rejects(client.score({ candidates }, { deadline: new Date(Date.now() - 1) }), {
      code: status.DEADLINE_EXCEEDED,
    });
  });

  it("sends the request id and extra metadata", async () => {
    const metadata = new Metadata();
    metadata.set("x-extra", "1");
    await client.score({ candidates }, { requestId: "req-42", metadata });
    assert.deepEqual(seen["score"]!.requestIds, ["req-42"]);
    assert.equal(metadata.get("x-request-id").length, 0, "the caller's Metadata is not modified");
  });

  it("cancels a call when its signal aborts", async () => {
    scoreDelayMs = 500;
    const controller = new AbortController();
    const pending = client.score({ candidates }, { signal: controller.signal });
    setTimeout(() => controller.abort(), 20);
    await assert.rejects(pending, { code: status.CANCELLED });
    await assert.rejects(client.score({ candidates }, { signal: AbortSignal.abort() }), { code: status.CANCELLED });
  });
});
