// Shared by the client's test files: a real gateway process with its built-in mock upstream,
// and what the mock streams for a prompt.

import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { once } from "node:events";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

export const ROOT = fileURLToPath(new URL("../../../", import.meta.url));
export const PYTHON = process.env.GATEWAY_PYTHON ?? `${ROOT}.venv/bin/python`;
const STARTUP_TIMEOUT_MS = 20_000;


/** Spawn the gateway on a free port; resolve once it logs `gateway.listening`. */
export async function startGateway(...extraArgs) {
  const proc = spawn(
    PYTHON,
    ["-m", "gateway", "serve", "--port", "0", "--log-format", "json", "--mock-delay-ms", "5", ...extraArgs],
    { cwd: ROOT, stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, PERPLEXITY_API_KEY: "" } },
  );
  const kill = () => proc.kill("SIGKILL");
  process.once("exit", kill); // never leave a gateway behind, even when the runner dies
  proc.once("exit", () => process.off("exit", kill));
  const lines = createInterface({ input: proc.stderr });
  const seen = [];
  let mockBase = null;
  const listening = new Promise((resolve, reject) => {
    lines.on("line", (line) => {
      seen.push(line);
      let entry;
      try {
        entry = JSON.parse(line);
      } catch {
        return;
      }
      if (entry.event === "upstream.simulated") mockBase = new URL(entry.mock_url).origin;
      if (entry.event === "gateway.listening") resolve(entry.url);
    });
    proc.once("exit", (code) => reject(new Error(`gateway exited with ${code}:\n${seen.join("\n")}`)));
    setTimeout(
      () => reject(new Error(`no gateway.listening within ${STARTUP_TIMEOUT_MS} ms:\n${seen.join("\n")}`)),
      STARTUP_TIMEOUT_MS,
    ).unref();
  });
  const url = await listening;
  assert.ok(mockBase, "the gateway logs the built-in mock's URL");
  return { proc, url, mockBase };
}

/** What the mock streams for `prompt`: computed by the mock's own pure functions. */
export async function expectedText(prompt) {
  const code = [
    "import sys",
    "from gateway.mock import choose_answer, parse_directive, text_chunks",
    "q, k = parse_directive(sys.argv[1])",
    "sys.stdout.write(''.join(text_chunks(choose_answer(q).text, k.chunks)))",
  ].join("\n");
  const { stdout } = await promisify(execFile)(PYTHON, ["-c", code, prompt], { cwd: ROOT });
  return stdout;
}

/** The mock's record of the request tagged `tag`, once it is no longer open. */
export async function upstreamRecord(mockBase, tag, timeoutMs = 5_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const response = await fetch(`${mockBase}/_mock/stats?tag=${encodeURIComponent(tag)}`);
    const [record] = (await response.json()).records;
    if (record && record.outcome !== "open") return record;
    if (Date.now() > deadline) throw new Error(`upstream request ${tag} still ${record?.outcome}`);
    await new Promise((resolve) => setTimeout(resolve, 20)); // polling the mock: no push API
  }
}

/** Stop a gateway started by startGateway (SIGTERM: it drains). */
export async function stopGateway(instance) {
  if (instance && instance.proc.exitCode === null) {
    instance.proc.kill("SIGTERM");
    await once(instance.proc, "exit");
  }
}
