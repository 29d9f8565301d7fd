#!/usr/bin/env python3
"""Rewrites the key table in docs/configuration.md from src/config/keys.rs.

The table is checked by a unit test (config::doc_tests); run this (`make docs`) after adding or
changing a key.
"""
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent
src = (root / "src/config/keys.rs").read_text()
body = src[src.index("pub static KEYS"):]
rows = []
pattern = r'Key \{\s*name: "([^"]+)",\s*kind: (.*?),\s*default: (Some\("([^"]*)"\)|None),\s*doc: "((?:[^"\\]|\\.)*)"'
for m in re.finditer(pattern, body, re.S):
    name, _kind, _, default, doc = m.groups()
    doc = re.sub(r"\\\n\s*", "", doc)
    flag = "--" + name.replace(".", "-").replace("_", "-")
    env = "STATIC_INGRESS_" + name.replace(".", "_").upper()
    shown = "required" if default is None else ('`""`' if default == "" else f"`{default}`")
    rows.append(f"| `{name}` | {shown} | `{flag}` | `{env}` | {doc} |")

doc_path = root / "docs/configuration.md"
doc = doc_path.read_text()
head = "|---|---|---|---|---|\n"
start = doc.index(head) + len(head)
end = doc.index("\n## Errors")
doc_path.write_text(doc[:start] + "\n".join(rows) + "\n" + doc[end:])
print(f"{len(rows)} keys written to {doc_path.relative_to(root)}")
