#!/usr/bin/env python3
"""Rewrites the README's configuration table from shared/src/config.rs (VARIABLES).

tests/docs.rs fails when the two disagree; run this to bring the README up to date.
"""
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent
src = (root / "shared/src/config.rs").read_text()
body = src[src.index("pub const VARIABLES"):]
body = body[: body.index("];")]
rows = []
for kind, name, default, doc in re.findall(r'(secret|var)\(\s*"([A-Z_]+)",\s*"([^"]*)",\s*"((?:[^"\\]|\\.)*)"\s*,?\s*\)', body):
    doc = doc.replace('\\"', '"')
    if kind == "secret":
        doc += " Secret: never logged."
    rows.append(f"| `{name}` | {'`' + default + '`' if default else '(empty)'} | {doc} |")

readme = root / "README.md"
text = readme.read_text()
header = "| variable | default | meaning |\n|---|---|---|\n"
start = text.index(header) + len(header)
end = text.index("\n\n", start)
readme.write_text(text[:start] + "\n".join(rows) + text[end:])
print(f"README.md: {len(rows)} variables")
