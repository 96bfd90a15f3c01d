// Minimal offline OpenAPI viewer (Swagger UI needs a CDN; this page needs nothing but /openapi.json).
"use strict";
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function describeParams(op) {
  const rows = [];
  for (const p of op.parameters || []) {
    const s = p.schema || {};
    const type = s.type || (s.anyOf || []).map((x) => x.type).join(" | ") || (s.enum ? "enum" : "");
    const extra = s.enum ? " one of " + s.enum.join(", ") : (s.default !== undefined ? " (default " + s.default + ")" : "");
    rows.push(`${p.in} ${p.name}${p.required ? " (required)" : ""}: ${type}${extra}${p.description ? " - " + p.description : ""}`);
  }
  const body = op.requestBody && op.requestBody.content;
  if (body) rows.push("body: " + Object.keys(body).join(", ") + " (field 'file': the image)");
  return rows;
}

async function main() {
  const root = document.getElementById("api");
  try {
    const resp = await fetch("/openapi.json");
    const spec = await resp.json();
    root.replaceChildren(el("p", "", spec.info.description || ""));
    for (const [path, ops] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(ops)) {
        const box = el("div", "endpoint");
        const head = el("p");
        head.append(el("span", "method " + method, method.toUpperCase()), " ", el("code", "", path), " ", el("span", "muted", op.summary || ""));
        box.append(head);
        if (op.description) box.append(el("p", "", op.description));
        const params = describeParams(op);
        if (params.length) box.append(el("pre", "", params.join("\n")));
        box.append(el("p", "muted small", "responses: " + Object.keys(op.responses || {}).join(", ")));
        root.append(box);
      }
    }
  } catch (e) {
    root.replaceChildren(el("p", "error", "cannot load /openapi.json: " + e.message));
  }
}
main();
