// Fails when src/gen/ differs from a fresh `buf generate` of ../../protos (run via `npm run check-gen`,
// so buf and protoc-gen-ts_proto resolve from node_modules/.bin here or in the repository root).
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";

const committed = "src/gen";
const tmp = mkdtempSync(join(tmpdir(), "ml-serving-ts-gen-"));

function files(dir) {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => relative(dir, join(entry.parentPath ?? entry.path, entry.name)))
    .sort();
}

try {
  execFileSync("buf", ["generate", "../../protos", "--template", "buf.gen.yaml", "--output", tmp], { stdio: "inherit" });
  const fresh = join(tmp, committed);
  const want = files(fresh);
  const have = files(committed);
  const stale = [...new Set([...want, ...have])].filter(
    (f) => !want.includes(f) || !have.includes(f) || !readFileSync(join(fresh, f)).equals(readFileSync(join(committed, f))),
  );
  if (stale.length > 0) {
    spawnSync("diff", ["-ru", fresh, committed], { stdio: "inherit" });
    console.error(`stale TypeScript client: ${stale.join(", ")} differ from protos/; run 'npm run generate' and commit`);
    process.exitCode = 1;
  } else {
    console.log(`${committed} is up to date (${have.length} files)`);
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
