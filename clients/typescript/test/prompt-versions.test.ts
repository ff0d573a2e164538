// Unit tests of TIP_PROMPT_VERSION parsing, the random choice and the start-up check.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  type ListPromptVersionsResponse,
  PromptVersionSelector,
  UnknownPromptVersionError,
  checkPromptVersions,
  createPromptVersionSelector,
  parsePromptVersions,
  pickPromptVersion,
} from "../src/index";

/** An RNG that returns the given values in turn. */
function sequence(...values: number[]): () => number {
  let i = 0;
  return () => {
    const v = values[i % values.length]!;
    i += 1;
    return v;
  };
}

function fakeLister(versions: string[]) {
  const calls = { count: 0 };
  const response: ListPromptVersionsResponse = {
    versions: versions.map((version) => ({ version, description: "", contentHash: "" })),
    defaultVersion: versions[0] ?? "",
  };
  return {
    calls,
    listPromptVersions: async () => {
      calls.count += 1;
      return response;
    },
  };
}

describe("parsePromptVersions", () => {
  it("reads unset, empty and blank as the server default", () => {
    assert.deepEqual(parsePromptVersions(undefined), []);
    assert.deepEqual(parsePromptVersions(""), []);
    assert.deepEqual(parsePromptVersions("  "), []);
    assert.deepEqual(parsePromptVersions(" , ,"), []);
  });

  it("reads one version", () => {
    assert.deepEqual(parsePromptVersions("v2-mentor"), ["v2-mentor"]);
    assert.deepEqual(parsePromptVersions(" v2-mentor \n"), ["v2-mentor"]);
  });

  it("reads a comma-separated list, trimmed, empties and duplicates dropped, order kept", () => {
    assert.deepEqual(parsePromptVersions("v1,v2-mentor,v3-few-shot"), ["v1", "v2-mentor", "v3-few-shot"]);
    assert.deepEqual(parsePromptVersions(" v3-few-shot , v1,,v3-few-shot,"), ["v3-few-shot", "v1"]);
  });
});

describe("pickPromptVersion", () => {
  it("sends an empty version (server default) when none is configured, without drawing", () => {
    assert.equal(
      pickPromptVersion([], () => assert.fail("rng called")),
      "",
    );
  });

  it("always sends the single configured version", () => {
    assert.equal(
      pickPromptVersion(["v2-mentor"], () => assert.fail("rng called")),
      "v2-mentor",
    );
  });

  it("maps the RNG's [0, 1) uniformly onto the list", () => {
    const versions = ["v1", "v2-mentor", "v3-few-shot"];
    const picks = [0, 0.3333, 0.3334, 0.6666, 0.6667, 0.999999].map((u) => pickPromptVersion(versions, () => u));
    assert.deepEqual(picks, ["v1", "v1", "v2-mentor", "v2-mentor", "v3-few-shot", "v3-few-shot"]);
  });

  it("gives every version an equal share over an even grid of draws", () => {
    const versions = ["a", "b", "c", "d"];
    const counts = new Map<string, number>();
    const n = 1000;
    for (let i = 0; i < n; i++) {
      const v = pickPromptVersion(versions, () => i / n);
      counts.set(v, (counts.get(v) ?? 0) + 1);
    }
    assert.deepEqual([...counts.entries()], [["a", 250], ["b", 250], ["c", 250], ["d", 250]]);
  });

  it("uses Math.random by default and stays within the list", () => {
    const versions = ["v1", "v2-mentor"];
    for (let i = 0; i < 100; i++) assert.ok(versions.includes(pickPromptVersion(versions)));
  });

  it("rejects an RNG outside [0, 1)", () => {
    assert.throws(() => pickPromptVersion(["a", "b"], () => 1), RangeError);
    assert.throws(() => pickPromptVersion(["a", "b"], () => -0.1), RangeError);
    assert.throws(() => pickPromptVersion(["a", "b"], () => Number.NaN), RangeError);
  });
});

describe("PromptVersionSelector", () => {
  it("draws a fresh version per request from the injected RNG", () => {
    const selector = new PromptVersionSelector(["v1", "v2-mentor", "v3-few-shot"], sequence(0.9, 0.1, 0.5));
    assert.deepEqual([selector.next(), selector.next(), selector.next()], ["v3-few-shot", "v1", "v2-mentor"]);
  });
});

describe("checkPromptVersions", () => {
  const known = ["v1", "v2-mentor", "v3-few-shot"];

  it("accepts known versions", () => {
    checkPromptVersions([], known);
    checkPromptVersions(["v3-few-shot", "v1"], known);
  });

  it("names the unknown versions and the known ones", () => {
    assert.throws(
      () => checkPromptVersions(["v1", "v9", "mentor"], known),
      (err: unknown) => {
        assert.ok(err instanceof UnknownPromptVersionError);
        assert.deepEqual(err.unknown, ["v9", "mentor"]);
        assert.deepEqual(err.known, known);
        assert.equal(
          err.message,
          "TIP_PROMPT_VERSION names unknown prompt version(s): v9, mentor; the server knows: v1, v2-mentor, v3-few-shot",
        );
        return true;
      },
    );
  });
});

describe("createPromptVersionSelector", () => {
  it("validates the configured list against ListPromptVersions", async () => {
    const lister = fakeLister(["v1", "v2-mentor", "v3-few-shot"]);
    const selector = await createPromptVersionSelector(lister, "v2-mentor, v3-few-shot", sequence(0.75));
    assert.equal(lister.calls.count, 1);
    assert.deepEqual(selector.versions, ["v2-mentor", "v3-few-shot"]);
    assert.equal(selector.next(), "v3-few-shot");
  });

  it("fails at start-up on an unknown version", async () => {
    const lister = fakeLister(["v1", "v2-mentor"]);
    await assert.rejects(createPromptVersionSelector(lister, "v1,v3-few-shot"), {
      name: "UnknownPromptVersionError",
      message: /unknown prompt version\(s\): v3-few-shot; the server knows: v1, v2-mentor$/,
    });
  });

  it("does not ask the server when nothing is configured", async () => {
    const lister = fakeLister([]);
    const selector = await createPromptVersionSelector(lister, "");
    assert.equal(lister.calls.count, 0);
    assert.equal(selector.next(), "");
  });

  it("reads TIP_PROMPT_VERSION by default", async () => {
    const saved = process.env["TIP_PROMPT_VERSION"];
    process.env["TIP_PROMPT_VERSION"] = "v2-mentor";
    try {
      const selector = await createPromptVersionSelector(fakeLister(["v1", "v2-mentor"]));
      assert.equal(selector.next(), "v2-mentor");
    } finally {
      if (saved === undefined) delete process.env["TIP_PROMPT_VERSION"];
      else process.env["TIP_PROMPT_VERSION"] = saved;
    }
  });
});
