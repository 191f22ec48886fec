// CI cannot cross-build the functions in its time budget, so synthesis runs against
// placeholder artifacts: one `bootstrap` per function, where cargo-lambda would put it.
import fs from "node:fs";
import path from "node:path";

const functions = JSON.parse(fs.readFileSync(new URL("../functions.json", import.meta.url), "utf8"));
const dir = new URL("./.artifacts/", import.meta.url).pathname;
// Every function, and the migrate step's binary.
for (const binary of [...functions.map((f) => f.binary), "migrate"]) {
  fs.mkdirSync(path.join(dir, binary), { recursive: true });
  fs.writeFileSync(path.join(dir, binary, "bootstrap"), "#!/bin/sh\necho placeholder\n", { mode: 0o755 });
}
console.log(`placeholder artifacts for ${functions.length} functions in ${dir}`);
