// qscore explorer: vanilla JavaScript against the service's own API (same origin, nothing else).
"use strict";

const GROUP_NAMES = {
  discriminative: "discriminative",
  upper_tail: "upper tail",
  lower_tail: "lower tail",
  never_dominant: "never dominant",
};

// An element with attributes and children; text always goes in as text (never parsed as HTML).
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "n/a";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && Math.abs(value) < 0.01) return value.toExponential(2);
  return value.toFixed(digits);
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  return { ok: response.ok, status: response.status, body };
}

function errorText(result) {
  const detail = result.body && result.body.detail;
  if (detail && detail.code) return `${detail.code}: ${detail.message}`;
  return `HTTP ${result.status}`;
}

// -- what is served ----------------------------------------------------------------------
async function loadServing() {
  const target = document.getElementById("serving");
  try {
    const ready = await getJSON("/readyz");
    const b = ready.body || {};
    target.textContent = ready.ok
      ? `serving model ${b.model_version}, feature set ${b.feature_set_version}`
      : `not ready${b.reason ? `: ${b.reason}` : ""}`;
  } catch (err) {
    target.textContent = `the service does not answer (${err})`;
  }
}

// -- explaining images -------------------------------------------------------------------
function massBar(dec) {
  const total = dec.l1_norm || 1;
  const parts = [["d", dec.discriminative_mass]];
  for (const [group, mass] of Object.entries(dec.noisy_mass_by_group)) parts.push([group, mass]);
  return h(
    "div",
    { class: "mass", title: "the L1 norm of h: on D, and outside it by group" },
    parts.map(([cls, mass]) => h("span", { class: cls, style: `width:${(100 * mass) / total}%` })),
  );
}

function legend() {
  return h(
    "div",
    { class: "legend" },
    "L1 norm:",
    h("i", { class: "mass-d", style: "background:var(--d)" }), "D",
    h("i", { style: "background:var(--upper)" }), "upper tail",
    h("i", { style: "background:var(--lower)" }), "lower tail",
    h("i", { style: "background:#9aa1ad" }), "never dominant",
  );
}

// Why the typicality and the risk are what they are (body.why): the component that sets the
// typicality, and the signals that add most to the risk's log-odds.
function whyLines(why) {
  const lines = [];
  if (why.typicality) {
    const t = why.typicality;
    const over = t.components.filter((c) => c.atypical).map((c) => `${c.name} ${fmt(c.typicality)}`);
    lines.push(
      over.length
        ? `atypical by ${over.join(", ")} (over 1)`
        : `typicality set by ${t.driver} (${fmt(t.components[0].typicality)}; atypical above 1)`,
    );
  }
  const terms = (signals, part) =>
    [...signals]
      .sort((a, b) => Math.abs(b[part]) - Math.abs(a[part]))
      .slice(0, 3)
      .map((s) => `${s.name} ${s[part] >= 0 ? "+" : ""}${fmt(s[part], 2)}`)
      .join(", ");
  if (why.risk) {
    const r = why.risk;
    let line = `risk: ${fmt(r.of_a_class)} as an image of a class (largest terms of its log-odds: ` +
      `${terms(r.signals, "of_a_class")}), ${fmt(r.no_class)} of no class`;
    if (r.no_class_intercept !== null) line += ` (${terms(r.signals, "no_class")})`;
    lines.push(line);
  }
  return lines.map((line) => h("div", { class: "muted why" }, line));
}

function renderExplanation(card, name, body) {
  const s = body.score;
  const dec = body.decomposition;
  const maps = body.heatmaps;
  const flagged = s.reasons.length > 0;
  const verdict = h(
    "div",
    { class: "verdict" },
    h("span", {}, "Q-Score ", h("b", { class: "q" }, fmt(s.q_score, 4))),
    h("span", {}, "alpha ", h("b", {}, fmt(body.feature_set.alpha, 4))),
    h("span", {}, "typicality ", h("b", { class: "typicality" }, fmt(s.typicality))),
    h("span", {}, "risk ", h("b", { class: "risk" }, fmt(s.risk))),
    h(
      "span",
      { class: "reasons" },
      flagged
        ? s.reasons.map((r) => h("span", { class: "badge flag" }, r))
        : h("span", { class: "badge ok" }, "no flag"),
    ),
  );
  const active = dec.active.length
    ? `dominant discriminative features: ${dec.active
        .map((c) => `${c.index} (${(100 * c.share).toFixed(0)}%)`)
        .join(", ")}`
    : "no dominant discriminative feature: Q-Score 0";
  const noisy = dec.noisy_dominant.length
    ? `dominant noisy features: ${dec.noisy_dominant.map((c) => `${c.index} (${GROUP_NAMES[c.group]})`).join(", ")}`
    : "no dominant noisy feature";
  const heatmaps = h(
    "div",
    { class: "heatmaps" },
    maps.features.map((f) =>
      h(
        "figure",
        { class: "heatmap", dataset: { feature: f.index } },
        h("img", { src: `data:image/png;base64,${f.png}`, alt: `feature ${f.index} heatmap`, class: "overlay" }),
        h(
          "figcaption",
          {},
          h("button", { type: "button", onclick: () => showFeature(f.index), title: "open in the atlas" },
            `feature ${f.index}`),
          h("br"),
          `${GROUP_NAMES[f.group]}${f.dominant ? ", dominant" : ""}`,
          h("br"),
          `h = ${fmt(f.value)}`,
        ),
      ),
    ),
  );
  card.replaceChildren(
    h("img", { class: "input", src: `data:image/png;base64,${maps.image_png}`, alt: name }),
    h(
      "div",
      {},
      h("h3", {}, name),
      verdict,
      ...whyLines(body.why),
      massBar(dec),
      legend(),
      h("div", { class: "muted" }, `noisy share of the L1 norm ${fmt(dec.noisy_share, 2)}; ${active}; ${noisy}`),
      h("div", { class: "muted" }, `heatmaps: ${maps.method.replaceAll("_", " ")}`),
      heatmaps,
    ),
  );
  card.dataset.state = "done";
}

async function explainFile(file) {
  const card = h("div", { class: "card", dataset: { state: "pending", name: file.name } },
    h("div", { class: "muted" }, `${file.name}: explaining…`));
  document.getElementById("results").prepend(card);
  const form = new FormData();
  form.append("files", file, file.name);
  const top = document.getElementById("top").value;
  try {
    const result = await getJSON(`/explain?top=${encodeURIComponent(top)}`, { method: "POST", body: form });
    if (!result.ok) {
      card.replaceChildren(h("div", { class: "error" }, `${file.name}: ${errorText(result)}`));
      card.dataset.state = "error";
      return;
    }
    renderExplanation(card, file.name, result.body);
  } catch (err) {
    card.replaceChildren(h("div", { class: "error" }, `${file.name}: ${err}`));
    card.dataset.state = "error";
  }
}

async function explainFiles(files) {
  // one at a time: the service explains one image at a time anyway (and says 503 beyond a few)
  for (const file of files) await explainFile(file);
}

function setUpDrop() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => explainFiles([...input.files]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    explainFiles([...event.dataTransfer.files]);
  });
}

// -- the atlas ---------------------------------------------------------------------------
let atlasFeatures = [];

function fillAtlasTable() {
  const group = document.getElementById("atlas-group").value;
  const rows = atlasFeatures
    .filter((f) => !group || f.group === group)
    .map((f) =>
      h(
        "tr",
        { dataset: { feature: f.index }, onclick: () => showFeature(f.index) },
        h("td", {}, f.index),
        h("td", {}, GROUP_NAMES[f.group]),
        h("td", {}, f.n_dominant),
        h("td", {}, f.purity === null ? "n/a" : `${(100 * f.purity).toFixed(0)}%`),
        h("td", {}, f.top_class || ""),
      ),
    );
  document.querySelector("#atlas-table tbody").replaceChildren(...rows);
}

async function loadAtlas() {
  const status = document.getElementById("atlas-status");
  const result = await getJSON("/atlas");
  if (!result.ok) {
    status.textContent =
      result.status === 404 ? `No atlas yet: ${errorText(result)}` : `The atlas could not be read: ${errorText(result)}`;
    return;
  }
  const a = result.body;
  atlasFeatures = a.features;
  status.textContent =
    `${a.features.length} features of feature set ${a.feature_set} over ${a.n_images} images` +
    `${a.dataset ? ` of ${a.dataset}` : ""} (${a.method.replaceAll("_", " ")} heatmaps, eps ${a.eps})` +
    `${a.classes ? "" : "; the data set has no labels"}`;
  fillAtlasTable();
}

async function showFeature(index) {
  const target = document.getElementById("atlas-feature");
  for (const row of document.querySelectorAll("#atlas-table tbody tr")) {
    row.classList.toggle("selected", row.dataset.feature === String(index));
  }
  const result = await getJSON(`/atlas/${index}`);
  if (!result.ok) {
    target.replaceChildren(h("p", { class: "error" }, `feature ${index}: ${errorText(result)}`));
    target.scrollIntoView({ block: "nearest" });
    return;
  }
  const f = result.body;
  const most = f.classes ? Math.max(...Object.values(f.classes)) : 0;
  const bars = f.classes
    ? h(
        "div",
        { class: "bars" },
        Object.entries(f.classes).map(([name, n]) =>
          h("div", {}, h("span", {}, name), h("span", { class: "bar", style: `width:${(100 * n) / most}%` }),
            h("span", {}, `${((100 * n) / f.n_dominant).toFixed(0)}%`)),
        ),
      )
    : h("p", { class: "muted" }, "the data set has no labels");
  const sheetPath = new URL(f.sheet_url, window.location.href);
  target.replaceChildren(
    h("h3", {}, `feature ${f.index} (${GROUP_NAMES[f.group]})`),
    h(
      "p",
      { class: "muted" },
      `dominant for ${f.n_dominant} images (${(100 * f.dominant_share).toFixed(1)}%)` +
        (f.purity !== null ? `; top class ${f.top_class} ${(100 * f.purity).toFixed(0)}%, ` +
          `${f.classes_for_80} classes cover 80%` : ""),
    ),
    f.top.length
      ? h("img", { class: "sheet", src: sheetPath.pathname + sheetPath.search, alt: `feature ${f.index} contact sheet` })
      : h("p", { class: "muted" }, "no image of the sample has it dominant"),
    bars,
  );
  target.dataset.feature = String(f.index);
  target.scrollIntoView({ block: "nearest" });
}

// -- recent traffic (GET /monitor, where the service has it) -----------------------------
function sparkline(values) {
  const w = 160;
  const hgt = 28;
  const max = Math.max(...values);
  const min = Math.min(...values);
  const span = max - min || 1;
  const points = values.map((v, i) => `${(i * w) / Math.max(values.length - 1, 1)},${hgt - ((v - min) * hgt) / span}`);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", hgt);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2f6fde");
  svg.append(line);
  return svg;
}

function monitorRows(data, prefix = "") {
  const rows = [];
  for (const [key, value] of Object.entries(data)) {
    const name = prefix + key;
    if (Array.isArray(value) && value.length && value.every((v) => typeof v === "number")) {
      rows.push(h("dt", {}, name), h("dd", {}, sparkline(value), ` last ${fmt(value[value.length - 1])}`));
    } else if (Array.isArray(value) && value.every((v) => v && typeof v === "object")) {
      // GET /monitor's "models": one block per served model, headed by its versions
      if (!value.length) rows.push(h("dt", {}, name), h("dd", {}, "none yet"));
      value.forEach((item, i) => {
        const label = item.model_version === undefined
          ? `${name}[${i}]`
          : `model ${item.model_version}, feature set ${item.feature_set_version}`;
        rows.push(h("dt", { class: "group" }, label), h("dd", {}, ""));
        const rest = Object.fromEntries(
          Object.entries(item).filter(([k]) => k !== "model_version" && k !== "feature_set_version"));
        rows.push(...monitorRows(rest, prefix));
      });
    } else if (value && typeof value === "object" && !Array.isArray(value)) {
      rows.push(...monitorRows(value, `${name}.`));
    } else if (!Array.isArray(value)) {
      rows.push(h("dt", {}, name), h("dd", {}, Number.isInteger(value) ? String(value) : fmt(value))); // counts as counts
    }
  }
  return rows;
}

async function loadMonitor() {
  const target = document.getElementById("monitor");
  const result = await getJSON("/monitor");
  if (result.status === 404 || result.status === 405) {
    target.textContent = "This server has no /monitor endpoint yet: recent-traffic figures appear here once it does.";
    return;
  }
  if (!result.ok || !result.body) {
    target.textContent = `/monitor: ${errorText(result)}`;
    return;
  }
  target.classList.remove("muted");
  target.classList.add("monitor");
  target.replaceChildren(h("dl", {}, monitorRows(result.body)));
}

document.getElementById("atlas-group").addEventListener("change", fillAtlasTable);
document.getElementById("monitor-refresh").addEventListener("click", loadMonitor);
setInterval(loadMonitor, 15000); // the window moves with traffic: the panel follows it
setUpDrop();
loadServing();
loadAtlas();
loadMonitor();
