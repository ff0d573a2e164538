// Contract tests: the generated TypeScript client against the real Python server (offline LLM
// route, shipped model), started by the harness in ./server.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { after, before, describe, it } from "node:test";

import {
  FinishReason,
  type GenerateStreamEnd,
  InferenceClient,
  type ListPromptVersionsResponse,
  ScoreLayout,
  ScoreRequest,
  UnknownPromptVersionError,
  columnarScoreRequest,
  createPromptVersionSelector,
  isServiceError,
  scoresOf,
  status,
} from "../src/index";
import { REPO_ROOT, type RunningServer, startServer } from "./server";

const OFFLINE_MODEL = "offline/tip-composer-1";
const KNOWN_VERSIONS = ["v1", "v2-mentor", "v3-few-shot"];

function hashOf(listed: ListPromptVersionsResponse, version: string): string {
  const entry = listed.versions.find((v) => v.version === version);
  assert.ok(entry, `ListPromptVersions has no ${version}`);
  return entry.contentHash;
}

/** The ghz Score scenario's request (proto3 JSON, snake_case names) as a ScoreRequest. */
function scoreScenario(): ScoreRequest {
  const scenario = JSON.parse(readFileSync(resolve(REPO_ROOT, "bench", "ghz", "score.json"), "utf8"));
  return ScoreRequest.fromJSON(scenario.data);
}

/** Asserts `err` is a gRPC error with `code` and returns its details string. */
function detailsOf(err: unknown, code: number): string {
  assert.ok(isServiceError(err), `expected a gRPC error, got ${String(err)}`);
  assert.equal(err.code, code, `status ${err.code} (${err.details})`);
  return err.details;
}

describe("contract: TypeScript client against the Python server", () => {
  let server: RunningServer;
  let client: InferenceClient;
  let listed: ListPromptVersionsResponse;

  before(async () => {
    server = await startServer();
    client = new InferenceClient(server.address, { deadlinesMs: { score: 10_000 } });
    listed = await client.listPromptVersions();
  });

  after(async () => {
    client?.close();
    await server?.stop();
  });

  it("ListPromptVersions lists the published versions, their hashes and the default", () => {
    const versions = listed.versions.map((v) => v.version);
    for (const v of KNOWN_VERSIONS) assert.ok(versions.includes(v), `${v} missing from ${versions.join(", ")}`);
    assert.equal(listed.defaultVersion, "v1");
    for (const v of listed.versions) {
      assert.match(v.contentHash, /^[0-9a-f]{64}$/);
      assert.ok(v.description.length > 0, `${v.version} has no description`);
    }
  });

  it("Score ranks the ghz scenario's 20 candidates (columnar form) in request order", async () => {
    const request = scoreScenario();
    assert.equal(request.candidateIds.length, 20);
    assert.equal(request.candidateValues.length, 20 * request.candidateFeatureNames.length);
    assert.equal(request.responseLayout, ScoreLayout.SCORE_LAYOUT_COLUMNS);

    const response = await client.score(request, { requestId: "ts-contract-score" });
    assert.equal(response.scores.length, 0, "asked for the columnar layout");
    assert.deepEqual(response.candidateIds, request.candidateIds);
    assert.equal(response.candidateScores.length, 20);
    for (const s of scoresOf(response)) assert.ok(s.score >= 0 && s.score <= 1, `score ${s.score} of ${s.id}`);
    assert.equal(response.modelName, "tips-ranker");
    assert.ok(response.modelVersion.length > 0, "model_version is empty");
  });

  it("columnarScoreRequest, the per-candidate form and both layouts give the same scores", async () => {
    const scenario = scoreScenario();
    const k = scenario.candidateFeatureNames.length;
    const named = scenario.candidateIds.map((id, i) => ({
      id,
      features: Object.fromEntries(
        scenario.candidateFeatureNames.map((name, j) => [name, scenario.candidateValues[i * k + j] ?? Number.NaN]),
      ),
    }));
    const context = Object.fromEntries(
      scenario.contextFeatureNames.map((name, j) => [name, scenario.contextValues[j] ?? Number.NaN]),
    );
    const built = columnarScoreRequest({ userId: "user-7", context, candidates: named });
    const perCandidate = ScoreRequest.fromPartial({
      userId: "user-7",
      contextFeatureNames: scenario.contextFeatureNames,
      contextValues: scenario.contextValues,
      candidateFeatureNames: scenario.candidateFeatureNames,
      candidates: named.map((c) => ({ id: c.id, values: scenario.candidateFeatureNames.map((n) => c.features[n] ?? 0) })),
    });
    const columns = scoresOf(await client.score(built));
    const rows = await client.score(perCandidate);
    assert.equal(rows.scores.length, 20, "the default layout is one CandidateScore each");
    assert.deepEqual(columns, scoresOf(rows));
    assert.deepEqual(columns, scoresOf(await client.score(scenario)));
  });

  it("Score names the offending field on a bad request", async () => {
    const err = await client.score({ ...scoreScenario(), candidateValues: [0.5] }).then(
      () => assert.fail("Score accepted a short candidate_values"),
      (e: unknown) => e,
    );
    assert.match(detailsOf(err, status.INVALID_ARGUMENT), /^candidate_values: expected 20 x /);
  });

  it("Generate with no version uses the server default and echoes version, hash and model", async () => {
    const response = await client.generate({
      userId: "user-7",
      context: { topic: "sleep", goal: "sleep by 11pm", interests: ["reading"] },
    });
    assert.ok(response.text.length > 0, "empty tip");
    assert.equal(response.promptVersion, "v1");
    assert.equal(response.promptHash, hashOf(listed, "v1"));
    assert.equal(response.model, OFFLINE_MODEL);
    assert.equal(response.fallback, false);
    assert.equal(response.finishReason, FinishReason.FINISH_REASON_STOP);
    const usage = response.usage;
    assert.ok(usage && usage.completionTokens > 0 && usage.promptTokens > 0, "usage missing");
    assert.equal(usage.totalTokens, usage.promptTokens + usage.completionTokens);
  });

  it("Generate uses the version asked for", async () => {
    const response = await client.generate({ userId: "user-7", promptVersion: "v2-mentor", context: { topic: "focus" } });
    assert.equal(response.promptVersion, "v2-mentor");
    assert.equal(response.promptHash, hashOf(listed, "v2-mentor"));
  });

  it("GenerateStream sends text deltas, then one end message with the totals", async () => {
    const deltas: string[] = [];
    const ends: GenerateStreamEnd[] = [];
    for await (const message of client.generateStream({
      userId: "user-7",
      promptVersion: "v3-few-shot",
      context: { topic: "money", goal: "save for a bike" },
    })) {
      assert.ok(message.event, "a message with no event");
      assert.equal(ends.length, 0, "a message after the end message");
      if (message.event.$case === "textDelta") deltas.push(message.event.value);
      else ends.push(message.event.value);
    }
    assert.ok(deltas.length > 0, "no text deltas");
    assert.ok(deltas.join("").trim().length > 0, "empty streamed text");
    assert.equal(ends.length, 1, "no end message");
    const end = ends[0]!;
    assert.equal(end.promptVersion, "v3-few-shot");
    assert.equal(end.promptHash, hashOf(listed, "v3-few-shot"));
    assert.equal(end.model, OFFLINE_MODEL);
    assert.equal(end.fallback, false);
    assert.equal(end.finishReason, FinishReason.FINISH_REASON_STOP);
    assert.ok(end.usage && end.usage.completionTokens > 0, "usage missing");
    assert.equal(end.usage.totalTokens, end.usage.promptTokens + end.usage.completionTokens);
  });

  it("an unknown prompt version is INVALID_ARGUMENT listing the known versions", async () => {
    const unary = await client.generate({ userId: "user-7", promptVersion: "v9-nope" }).then(
      () => assert.fail("Generate accepted an unknown version"),
      (e: unknown) => e,
    );
    const details = detailsOf(unary, status.INVALID_ARGUMENT);
    assert.match(details, /v9-nope/);
    for (const v of KNOWN_VERSIONS) assert.ok(details.includes(v), `"${details}" does not list ${v}`);

    const streamed = await (async () => {
      for await (const _ of client.generateStream({ userId: "user-7", promptVersion: "v9-nope" })) {
        assert.fail("GenerateStream sent a message for an unknown version");
      }
    })().then(
      () => assert.fail("GenerateStream accepted an unknown version"),
      (e: unknown) => e,
    );
    const streamDetails = detailsOf(streamed, status.INVALID_ARGUMENT);
    for (const v of KNOWN_VERSIONS) assert.ok(streamDetails.includes(v), `"${streamDetails}" does not list ${v}`);
  });

  it("a spent deadline is DEADLINE_EXCEEDED", async () => {
    await assert.rejects(client.score(scoreScenario(), { deadline: new Date(Date.now() - 1_000) }), {
      code: status.DEADLINE_EXCEEDED,
    });
    await assert.rejects(client.generate({ userId: "user-7", context: { topic: "sleep" } }, { timeoutMs: 1 }), {
      code: status.DEADLINE_EXCEEDED,
    });
    // The channel still works after those.
    assert.ok((await client.listPromptVersions()).versions.length >= KNOWN_VERSIONS.length);
  });

  it("the prompt-version selector checks TIP_PROMPT_VERSION against the server", async () => {
    const selector = await createPromptVersionSelector(client, "v1, v3-few-shot", () => 0.9);
    assert.equal(selector.next(), "v3-few-shot");
    const response = await client.generate({ userId: "user-7", promptVersion: selector.next(), context: { topic: "focus" } });
    assert.equal(response.promptVersion, "v3-few-shot");

    await assert.rejects(createPromptVersionSelector(client, "v1,v4-unknown"), (err: unknown) => {
      assert.ok(err instanceof UnknownPromptVersionError);
      assert.deepEqual(err.unknown, ["v4-unknown"]);
      for (const v of KNOWN_VERSIONS) assert.ok(err.known.includes(v));
      return true;
    });
  });
});
