// Parse and validate AsyncAPI documents with the AsyncAPI project's own parser
// (@asyncapi/parser: the JSON Schema of the spec, $refs, and its rules), and print
// what it found as JSON, one object per document:
//
//   node validate.mjs contract/asyncapi.json [more.json ...]
//   -> [{"file": ..., "valid": true, "diagnostics": [{"severity": "warning", "code": ..., "message": ..., "path": [...]}]}]
//
// Exit status: 0 if every document is valid (no diagnostic of severity error), 1 if
// one is not, 2 if a file cannot be read. tests/contract/test_contract.py runs it.
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import { Parser } from "@asyncapi/parser";

const SEVERITIES = ["error", "warning", "info", "hint"];

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate.mjs DOCUMENT.json [...]");
  process.exit(2);
}

const parser = new Parser();
const results = [];
for (const file of files) {
  let text;
  try {
    text = await readFile(file, "utf8");
  } catch (error) {
    console.error(`${file}: ${error.message}`);
    process.exit(2);
  }
  const { document, diagnostics } = await parser.parse(text, { source: resolve(file) });
  const found = diagnostics.map((d) => ({
    severity: SEVERITIES[d.severity] ?? String(d.severity),
    code: String(d.code),
    message: d.message,
    path: d.path,
  }));
  results.push({
    file,
    valid: document !== undefined && !found.some((d) => d.severity === "error"),
    diagnostics: found,
  });
}
console.log(JSON.stringify(results, null, 2));
process.exit(results.every((r) => r.valid) ? 0 : 1);
