/**
 * Typed client for ml-serving's `mlserving.v1.InferenceService`.
 *
 * A thin layer over the ts-proto/grpc-js stubs in `./gen` (generated from `protos/`, never edited
 * by hand): promises and async iterables instead of callbacks, a deadline on every call, and a
 * gRPC service config that retries Score (idempotent) on UNAVAILABLE and never retries Generate
 * or GenerateStream (an LLM call is neither free nor idempotent).
 */
import {
  type ChannelCredentials,
  type ChannelOptions,
  type ClientUnaryCall,
  Metadata,
  type ServiceError,
  credentials,
  status,
} from "@grpc/grpc-js";

import {
  type DeepPartial,
  GenerateRequest,
  type GenerateResponse,
  GenerateStreamRequest,
  type GenerateStreamResponse,
  InferenceServiceClient,
  ListPromptVersionsRequest,
  type ListPromptVersionsResponse,
  ScoreRequest,
  type ScoreResponse,
} from "./gen/mlserving/v1/inference_service";
import { ScoreLayout } from "./gen/mlserving/v1/scoring";

export * from "./gen/mlserving/v1/generation";
export * from "./gen/mlserving/v1/inference_service";
export * from "./gen/mlserving/v1/prompt";
export * from "./gen/mlserving/v1/scoring";
// Every generated file defines these helpers; the star exports above clash on them, so pick one.
export {
  type DeepPartial,
  type Exact,
  type MessageFns,
  protobufFileName,
  protobufPackage,
} from "./gen/mlserving/v1/inference_service";
export * from "./prompt-versions";
export { Metadata, status, credentials };
export type { ChannelCredentials, ChannelOptions, ServiceError };

/** Fully qualified name of the service, also its name in grpc.health.v1.Health. */
export const SERVICE_NAME = "mlserving.v1.InferenceService";

/** One candidate tip with its features by name (see `columnarScoreRequest`). */
export interface NamedCandidate {
  id: string;
  features: Record<string, number>;
}

/**
 * A Score request in the columnar form, which the server decodes without an object per candidate:
 * candidate ids as one list and every candidate's values as one packed, row-major float list,
 * asking for the columnar response (ids and scores as two lists; read it with `scoresOf`).
 * Feature names come from the context object and from the first candidate; every candidate must
 * carry the same names.
 */
export function columnarScoreRequest(args: {
  userId: string;
  context: Record<string, number>;
  candidates: NamedCandidate[];
}): ScoreRequest {
  const candidateFeatureNames = Object.keys(args.candidates[0]?.features ?? {});
  const candidateValues: number[] = [];
  for (const candidate of args.candidates) {
    const names = Object.keys(candidate.features);
    if (names.length !== candidateFeatureNames.length) {
      throw new Error(`candidate ${candidate.id} has features ${names.join(", ")}; expected ${candidateFeatureNames.join(", ")}`);
    }
    for (const name of candidateFeatureNames) {
      const value = candidate.features[name];
      if (value === undefined) throw new Error(`candidate ${candidate.id} has no feature ${name}`);
      candidateValues.push(value);
    }
  }
  return ScoreRequest.fromPartial({
    userId: args.userId,
    contextFeatureNames: Object.keys(args.context),
    contextValues: Object.values(args.context),
    candidateFeatureNames,
    candidateIds: args.candidates.map((c) => c.id),
    candidateValues,
    responseLayout: ScoreLayout.SCORE_LAYOUT_COLUMNS,
  });
}

/** The scores of a ScoreResponse in request order, whichever layout the request asked for. */
export function scoresOf(response: ScoreResponse): { id: string; score: number }[] {
  if (response.scores.length > 0) return response.scores.map((s) => ({ id: s.id, score: s.score }));
  return response.candidateIds.map((id, i) => ({ id, score: response.candidateScores[i] ?? Number.NaN }));
}

/** Per-method default deadlines in milliseconds. */
export interface Deadlines {
  score: number;
  generate: number;
  generateStream: number;
  listPromptVersions: number;
}

/**
 * Defaults: Score is a fast numpy call (p99 well under 50 ms) with room for its retries;
 * Generate waits on an LLM; a stream may run longer.
 */
export const DEFAULT_DEADLINES_MS: Readonly<Deadlines> = Object.freeze({
  score: 2_000,
  generate: 30_000,
  generateStream: 60_000,
  listPromptVersions: 5_000,
});

/**
 * The gRPC service config the client channel uses. Score is retried on UNAVAILABLE only, at
 * most 3 attempts with exponential backoff, all inside the call's one deadline. Generate and
 * GenerateStream get no retry policy: a retried LLM call costs again and may answer differently.
 * (grpc-js still makes transparent retries of attempts that never reached the server.)
 */
export const SERVICE_CONFIG = Object.freeze({
  methodConfig: [
    {
      name: [{ service: SERVICE_NAME, method: "Score" }],
      retryPolicy: {
        maxAttempts: 3,
        initialBackoff: "0.1s",
        maxBackoff: "1s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
});

/** How to build an {@link InferenceClient}. */
export interface InferenceClientOptions {
  /** Channel credentials; plaintext (insecure) when omitted, as inside a mesh with mTLS. */
  credentials?: ChannelCredentials;
  /** Overrides of {@link DEFAULT_DEADLINES_MS}, per method. */
  deadlinesMs?: Partial<Deadlines>;
  /** Extra grpc-js channel options (keepalive, message sizes...). The service config is ours. */
  channelOptions?: ChannelOptions;
}

/** Options of one call. */
export interface CallOptions {
  /** Deadline of this call in milliseconds from now; the client's default when omitted. */
  timeoutMs?: number;
  /** Absolute deadline; wins over timeoutMs. */
  deadline?: Date;
  /** Sent as `x-request-id`, so the server's logs carry the caller's id. */
  requestId?: string;
  /** Extra request metadata. */
  metadata?: Metadata;
  /** Aborting it cancels the call (status CANCELLED). */
  signal?: AbortSignal;
}

/** True when `err` is a gRPC error (it has a numeric `code` and a `details` string). */
export function isServiceError(err: unknown): err is ServiceError {
  return (
    err instanceof Error &&
    typeof (err as Partial<ServiceError>).code === "number" &&
    typeof (err as Partial<ServiceError>).details === "string"
  );
}

interface Cancellable {
  cancel(): void;
}

/** Client of `mlserving.v1.InferenceService`. One per process is enough; call close() at exit. */
export class InferenceClient {
  /** The generated grpc-js client, for anything this layer does not cover. */
  readonly raw: InferenceServiceClient;
  private readonly deadlines: Deadlines;

  /** @param address host:port, e.g. "ml-serving:50051" or "127.0.0.1:50051". */
  constructor(address: string, options: InferenceClientOptions = {}) {
    this.deadlines = { ...DEFAULT_DEADLINES_MS, ...options.deadlinesMs };
    this.raw = new InferenceServiceClient(address, options.credentials ?? credentials.createInsecure(), {
      ...options.channelOptions,
      "grpc.service_config": JSON.stringify(SERVICE_CONFIG),
      // Retries are on by default in grpc-js; say so, in case a caller's options turned them off.
      "grpc.enable_retries": 1,
    });
  }

  /** Scores every candidate for one user; retried on UNAVAILABLE (at most 3 attempts). */
  score(request: DeepPartial<ScoreRequest>, options: CallOptions = {}): Promise<ScoreResponse> {
    const message = ScoreRequest.fromPartial(request);
    return this.unary<ScoreResponse>(options, this.deadlines.score, (md, co, cb) =>
      this.raw.score(message, md, co, cb),
    );
  }

  /** Writes one personalised tip. Never retried by the client. */
  generate(request: DeepPartial<GenerateRequest>, options: CallOptions = {}): Promise<GenerateResponse> {
    const message = GenerateRequest.fromPartial(request);
    return this.unary<GenerateResponse>(options, this.deadlines.generate, (md, co, cb) =>
      this.raw.generate(message, md, co, cb),
    );
  }

  /**
   * Streams one personalised tip: text deltas, then one final message whose `event` is `end`
   * (prompt version and hash, model, usage, finish reason). Never retried by the client.
   * The call starts at the first `next()`; leaving the loop early cancels it.
   */
  async *generateStream(
    request: DeepPartial<GenerateStreamRequest>,
    options: CallOptions = {},
  ): AsyncGenerator<GenerateStreamResponse, void, undefined> {
    const message = GenerateStreamRequest.fromPartial(request);
    const call = this.raw.generateStream(
      message,
      buildMetadata(options),
      { deadline: deadlineOf(options, this.deadlines.generateStream) },
    );
    const unlink = linkAbort(call, options.signal);
    try {
      for await (const event of call) {
        yield event as GenerateStreamResponse;
      }
    } finally {
      unlink();
      call.cancel(); // no-op once the stream has ended; stops the server when the caller left early
    }
  }

  /** Lists the prompt versions the server's registry holds, and its default. */
  listPromptVersions(options: CallOptions = {}): Promise<ListPromptVersionsResponse> {
    const message = ListPromptVersionsRequest.fromPartial({});
    return this.unary<ListPromptVersionsResponse>(options, this.deadlines.listPromptVersions, (md, co, cb) =>
      this.raw.listPromptVersions(message, md, co, cb),
    );
  }

  /** Closes the channel; calls in flight fail with CANCELLED. */
  close(): void {
    this.raw.close();
  }

  private unary<Res>(
    options: CallOptions,
    defaultMs: number,
    start: (
      metadata: Metadata,
      callOptions: { deadline: Date },
      callback: (err: ServiceError | null, res?: Res) => void,
    ) => ClientUnaryCall,
  ): Promise<Res> {
    return new Promise<Res>((resolve, reject) => {
      let unlink = (): void => {};
      const call = start(buildMetadata(options), { deadline: deadlineOf(options, defaultMs) }, (err, res) => {
        unlink();
        if (err) reject(err);
        else resolve(res as Res);
      });
      unlink = linkAbort(call, options.signal);
    });
  }
}

function deadlineOf(options: CallOptions, defaultMs: number): Date {
  return options.deadline ?? new Date(Date.now() + (options.timeoutMs ?? defaultMs));
}

function buildMetadata(options: CallOptions): Metadata {
  const metadata = options.metadata ? options.metadata.clone() : new Metadata();
  if (options.requestId !== undefined) metadata.set("x-request-id", options.requestId);
  return metadata;
}

function linkAbort(call: Cancellable, signal: AbortSignal | undefined): () => void {
  if (!signal) return () => {};
  if (signal.aborted) {
    call.cancel();
    return () => {};
  }
  const onAbort = (): void => call.cancel();
  signal.addEventListener("abort", onAbort, { once: true });
  return () => signal.removeEventListener("abort", onAbort);
}
