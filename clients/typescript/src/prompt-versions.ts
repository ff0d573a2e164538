/**
 * Prompt-version selection, as the tips recommender does it from `TIP_PROMPT_VERSION`:
 *
 * - empty or unset: send an empty `prompt_version`, so the server uses its default;
 * - one version, e.g. `v2-mentor`: send it on every request;
 * - a comma-separated list, e.g. `v1,v2-mentor,v3-few-shot`: pick one uniformly at random per
 *   request (an A/B rotation).
 *
 * Store the `prompt_version` of the *response* (the version actually used), not the one sent.
 */
import type { ListPromptVersionsResponse } from "./gen/mlserving/v1/inference_service";

/** A source of uniform numbers in [0, 1), like Math.random; injectable for tests. */
export type Rng = () => number;

/**
 * Parses a `TIP_PROMPT_VERSION` value: entries are trimmed, empty ones dropped, duplicates
 * dropped (so the rotation stays uniform across distinct versions). `[]` means the server's
 * default.
 */
export function parsePromptVersions(raw: string | undefined): string[] {
  const versions: string[] = [];
  for (const entry of (raw ?? "").split(",")) {
    const version = entry.trim();
    if (version !== "" && !versions.includes(version)) versions.push(version);
  }
  return versions;
}

/** Picks the version for one request: `""` (server default) for `[]`, else uniform over the list. */
export function pickPromptVersion(versions: readonly string[], rng: Rng = Math.random): string {
  if (versions.length === 0) return "";
  if (versions.length === 1) return versions[0]!;
  const u = rng();
  if (!(u >= 0 && u < 1)) throw new RangeError(`rng must return a number in [0, 1), got ${u}`);
  return versions[Math.floor(u * versions.length)]!;
}

/** Thrown at start-up when `TIP_PROMPT_VERSION` names versions the server does not have. */
export class UnknownPromptVersionError extends Error {
  override readonly name = "UnknownPromptVersionError";

  constructor(
    /** The configured versions the server does not know. */
    readonly unknown: readonly string[],
    /** The versions the server's registry holds. */
    readonly known: readonly string[],
  ) {
    super(
      `TIP_PROMPT_VERSION names unknown prompt version(s): ${unknown.join(", ")}; ` +
        `the server knows: ${known.join(", ")}`,
    );
  }
}

/** Throws {@link UnknownPromptVersionError} when any configured version is not in `known`. */
export function checkPromptVersions(configured: readonly string[], known: readonly string[]): void {
  const unknown = configured.filter((v) => !known.includes(v));
  if (unknown.length > 0) throw new UnknownPromptVersionError(unknown, known);
}

/** Chooses the prompt version of each Generate request. */
export class PromptVersionSelector {
  readonly versions: readonly string[];
  private readonly rng: Rng;

  constructor(versions: readonly string[], rng: Rng = Math.random) {
    this.versions = Object.freeze([...versions]);
    this.rng = rng;
  }

  /** The version to send with the next request; `""` means the server's default. */
  next(): string {
    return pickPromptVersion(this.versions, this.rng);
  }
}

/** What {@link createPromptVersionSelector} needs of the client. */
export interface PromptVersionLister {
  listPromptVersions(): Promise<ListPromptVersionsResponse>;
}

/**
 * Builds the selector at start-up from `TIP_PROMPT_VERSION` (or `raw`), checking every
 * configured version against the server's ListPromptVersions; an unknown one throws
 * {@link UnknownPromptVersionError}. With nothing configured, the server is not asked.
 */
export async function createPromptVersionSelector(
  client: PromptVersionLister,
  raw: string | undefined = process.env["TIP_PROMPT_VERSION"],
  rng: Rng = Math.random,
): Promise<PromptVersionSelector> {
  const versions = parsePromptVersions(raw);
  if (versions.length > 0) {
    const listed = await client.listPromptVersions();
    checkPromptVersions(
      versions,
      listed.versions.map((v) => v.version),
    );
  }
  return new PromptVersionSelector(versions, rng);
}
