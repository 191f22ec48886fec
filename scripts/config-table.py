#!/usr/bin/env python3
"""Rewrites the configuration table in docs/CONFIGURATION.md from shared/src/config.rs
(VARIABLES).

tests/docs.rs fails when the two disagree; run this to bring the table up to date.
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

page = root / "docs/CONFIGURATION.md"
text = page.read_text()
header = "| variable | default | meaning |\n|---|---|---|\n"
start = text.index(header) + len(header)
end = text.find("\n\n", start)
end = len(text.rstrip("\n")) if end < 0 else end
page.write_text(text[:start] + "\n".join(rows) + text[end:])
print(f"docs/CONFIGURATION.md: {len(rows)} variables")
