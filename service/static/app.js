// The search page: one form posting multipart data to /search, results drawn as a grid.
"use strict";

const $ = (id) => document.getElementById(id);
let photo = null; // the File to send, from the picker, a drop or a paste

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

function setPhoto(file) {
  photo = file;
  const preview = $("preview");
  if (file) {
    preview.src = URL.createObjectURL(file);
    preview.alt = "photo to search with: " + file.name;
  }
  preview.hidden = !file;
  $("clear-image").hidden = !file;
}

async function loadCatalogues() {
  const response = await fetch("/catalogues");
  if (!response.ok) { setStatus("Cannot list catalogues: " + await errorText(response), true); return; }
  const body = await response.json();
  const select = $("catalogue");
  select.innerHTML = "";
  for (const c of body.catalogues) {
    const option = new Option(`${c.name} (${c.products})`, c.name);
    option.selected = c.name === body.default;
    select.add(option);
  }
  window.catalogues = Object.fromEntries(body.catalogues.map((c) => [c.name, c]));
  fillCategories();
  if (!body.catalogues.length) setStatus("No catalogue yet: load one with python -m ingest.", true);
}

function fillCategories() {
  const select = $("category");
  select.innerHTML = "";
  select.add(new Option("any", ""));
  const info = (window.catalogues || {})[$("catalogue").value];
  if (!info) return;
  for (const [path, count] of Object.entries(info.categories).sort()) {
    const depth = path.split(" > ").length - 1;
    select.add(new Option(`${"\u00a0\u00a0".repeat(depth)}${path.split(" > ").pop()} (${count})`, path));
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

function bar(label, value) {
  if (value === null || value === undefined) return "";
  const pct = Math.max(0, Math.min(100, value * 100));
  return `<div class="bar" title="${label} cosine ${value.toFixed(3)}">${label}<span class="track"><span class="fill" style="width:${pct}%"></span></span>${value.toFixed(2)}</div>`;
}

function escapeHtml(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function render(results) {
  const list = $("results");
  list.innerHTML = "";
  for (const r of results) {
    const p = r.product;
    const price = p.price != null ? `${p.price} ${p.currency || ""}` : "";
    const item = document.createElement("li");
    item.className = "card";
    item.innerHTML = `
      ${p.image_urls.length ? `<img src="${escapeHtml(p.image_urls[0])}" alt="${escapeHtml(p.title || p.id)}" loading="lazy">` : ""}
      <h2>${escapeHtml(p.title || p.id)}</h2>
      <div class="meta">${escapeHtml(r.retailer)} · ${escapeHtml(p.id)} ${price ? "· " + escapeHtml(price) : ""}</div>
      <div class="meta">${escapeHtml(p.category_path || "")}</div>
      <div class="meta">score ${r.score.toFixed(4)}</div>
      ${bar("image", r.scores.image)}${bar("text", r.scores.text)}${bar("words", r.scores.lexical)}
      ${r.decision ? `<div class="meta">decision: ${escapeHtml(r.decision)}${r.confidence != null ? ` (p = ${r.confidence.toFixed(2)})` : ""}</div>` : ""}`;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Same product elsewhere";
    button.addEventListener("click", () => showMatches(p));
    item.append(button);
    list.append(item);
  }
}

function showTitle(text) {
  $("results-title").textContent = text;
  $("results-title").hidden = !text;
}

async function showMatches(product) {
  const catalogue = $("catalogue").value;
  const url = `/catalogues/${encodeURIComponent(catalogue)}/products/${encodeURIComponent(product.retailer)}/${encodeURIComponent(product.id)}/matches?limit=${encodeURIComponent($("limit").value)}`;
  setStatus("Looking in the other shops…");
  const response = await fetch(url);
  if (!response.ok) { setStatus(await errorText(response), true); return; }
  const body = await response.json();
  showTitle(`Same product as “${body.product.title || body.product.id}” (${body.product.retailer}) in other shops`);
  render(body.matches);
  setStatus(body.matches.length ? `${body.matches.length} candidates${body.calibrated ? "" : " (no match threshold calibrated yet)"}` : "No candidates in other shops.");
}

async function search(event) {
  event.preventDefault();
  const form = new FormData();
  if (photo) form.append("image", photo);
  for (const id of ["text", "catalogue", "category", "limit", "fusion", "image_weight", "text_weight"]) form.append(id, $(id).value);
  setStatus("Searching…");
  $("submit").disabled = true;
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    if (!response.ok) { setStatus(await errorText(response), true); return; }
    const body = await response.json();
    showTitle("");
    render(body.results);
    setStatus(`${body.results.length} results from ${body.catalogue} by ${body.modes.join(" + ")}${body.fusion ? " (" + body.fusion + ")" : ""} in ${body.took_ms} ms`);
  } catch (e) {
    setStatus("The service did not answer: " + e, true);
  } finally {
    $("submit").disabled = false;
  }
}

function init() {
  $("search-form").addEventListener("submit", search);
  $("image").addEventListener("change", (e) => setPhoto(e.target.files[0] || null));
  $("clear-image").addEventListener("click", () => { $("image").value = ""; setPhoto(null); });
  $("catalogue").addEventListener("change", fillCategories);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) setPhoto(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) setPhoto(file);
  });
  loadCatalogues();
}

init();
