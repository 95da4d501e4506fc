// The search page. The form posts multipart data to /search; results are drawn as a grid with pages;
// "Same product elsewhere" opens a dialog filled from GET /catalogues/{c}/products/{r}/{id}/matches.
// Plain script served as is: no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);

const MODALITIES = [["image", "photo"], ["text", "text"], ["lexical", "words"]];
const MODE_NAMES = { image: "photo", text: "text", lexical: "words" };
const FUSION_NAMES = { rrf: "RRF", dbsf: "DBSF", weighted: "weighted RRF" };
const DECISIONS = { match: "match", uncertain: "uncertain", no_match: "no match", uncalibrated: "uncalibrated" };
const MAX_OFFSET = 1000; // the API's bound
const MATCHES_SHOWN = 8;

const state = {
  photo: null, // the File to send, from the picker, a drop or a paste
  previewUrl: null,
  catalogues: {}, // name -> GET /catalogues entry (counts and facets)
  query: null, // the fields of the search the results belong to, for paging
  offset: 0,
  searchTurn: 0, // answers to superseded requests are dropped
  matchesTurn: 0,
  opener: null, // the button that opened the dialog gets the focus back
};

// ---------------------------------------------------------------- small helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") node.style.cssText = value;  // through the CSSOM: the page's CSP refuses style attributes
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== ""));
  return node;
}

function say(message) {
  $("status").textContent = message;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function kilobytes(bytes) {
  return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1e3))} kB`;
}

function formatPrice(product) {
  if (product.price === null || product.price === undefined) return "no price";
  if (product.currency) {
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency: product.currency }).format(product.price);
    } catch (e) {
      return `${product.price} ${product.currency}`; // not an ISO 4217 code
    }
  }
  return String(product.price);
}

// What went wrong, in words a person can act on, for every error the API answers with.
async function problem(response) {
  let detail = "";
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) {
      detail = body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("; ");
    }
  } catch (e) {
    /* not JSON: a proxy's error page, say */
  }
  const status = response.status;
  const because = detail ? ` (${detail})` : "";
  if (status === 413) return `This photo is too large to send${because}. Choose a smaller file: a JPEG of a few MB is plenty.`;
  if (status === 422) {
    if (/give an image, a text/.test(detail)) return "Nothing to search for: add a photo or some words, then search again.";
    if (/image|photo/i.test(detail)) return `This file cannot be used as a photo${because}. Choose a JPEG, PNG or WebP picture.`;
    return `The search was refused: ${detail || "a field is out of bounds"}. Check the form and search again.`;
  }
  if (status === 404) return `Not found${because}. Reload the page to see the catalogues the service has now.`;
  if (status === 409) return `The store cannot serve this request right now${because}. Try again later, or ask whoever runs the service.`;
  if (status === 503) return `The product store is busy or unavailable${because}. Wait a moment and try again.`;
  if (status >= 500) return `The service failed (HTTP ${status})${because}. Try again; if it keeps failing, look at the service log.`;
  return `The request was refused (HTTP ${status})${because}.`;
}

const NO_ANSWER = "The service did not answer. Is it still running? Reload the page once it is back.";

// ---------------------------------------------------------------- the photo

function setPhoto(file, how) {
  state.photo = file;
  const preview = $("preview");
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = file ? URL.createObjectURL(file) : null;
  if (file) {
    preview.src = state.previewUrl;
    preview.alt = `photo to search with: ${file.name || "pasted image"}`;
    $("drop-hint").textContent = `${file.name || "pasted image"} (${kilobytes(file.size)}): Enter to change`;
    say(`Photo ${how}. Press Search (or Enter) to search with it.`);
  } else {
    preview.removeAttribute("src");
    $("drop-hint").textContent = "Drop or paste a photo here, or press Enter to choose a file";
  }
  preview.hidden = !file;
  $("drop").classList.toggle("has-photo", !!file);
  $("clear-image").hidden = !file;
}

function pickPhoto() {
  $("image").click();
}

// ---------------------------------------------------------------- catalogues and their facets

async function loadCatalogues() {
  let response;
  try {
    response = await fetch("/catalogues");
  } catch (e) {
    showError(NO_ANSWER);
    return;
  }
  if (!response.ok) {
    showError(`Cannot list the catalogues. ${await problem(response)}`);
    return;
  }
  const body = await response.json();
  state.catalogues = Object.fromEntries(body.catalogues.map((c) => [c.name, c]));
  const select = $("catalogue");
  select.replaceChildren();
  for (const c of body.catalogues) {
    select.add(new Option(`${c.name} (${c.products} products)`, c.name, false, c.name === body.default));
  }
  fillFacets();
  const reviewing = $("review-catalogue");
  reviewing.replaceChildren(...body.catalogues.map((c) => new Option(c.name, c.name, false, c.name === body.default)));
  fillReviewRetailers();
  if (!body.catalogues.length) showError("There is no catalogue yet: load one with python -m ingest, then reload this page.");
  else say(`Catalogue ${select.value} is ready: add a photo and/or words, then search.`);
}

function fillFacets() {
  const info = state.catalogues[$("catalogue").value];
  const category = $("category");
  category.replaceChildren(new Option("any", ""));
  // Full paths, sorted: a parent comes right before its children, and the closed list still says which one.
  for (const [path, count] of Object.entries(info ? info.categories : {}).sort(([a], [b]) => a.localeCompare(b))) {
    category.add(new Option(`${path} (${count})`, path));
  }
  const box = $("retailers");
  box.querySelectorAll(".retailer").forEach((node) => node.remove());
  const retailers = Object.entries(info ? info.retailers : {}).sort(([a], [b]) => a.localeCompare(b));
  $("retailers-empty").hidden = retailers.length > 0;
  for (const [name, count] of retailers) {
    const choice = el("select", { "data-retailer": name, "aria-label": `retailer ${name}` },
      new Option("any", ""), new Option("only", "only"), new Option("exclude", "exclude"));
    box.append(el("label", { class: "retailer" }, el("span", { text: `${name} (${count})` }), choice));
  }
}

function syncWeights() {
  const weighted = $("fusion").value === "weighted";
  for (const id of ["image_weight", "text_weight", "lexical_weight"]) $(id).disabled = !weighted;
}

// ---------------------------------------------------------------- searching and paging

function readForm() {
  const fields = [];
  const add = (name, value) => fields.push([name, value]);
  add("catalogue", $("catalogue").value);
  add("text", $("text").value);
  add("category", $("category").value);
  for (const select of document.querySelectorAll("#retailers select")) {
    if (select.value === "only") add("retailer", select.dataset.retailer);
    if (select.value === "exclude") add("exclude_retailer", select.dataset.retailer);
  }
  add("fusion", $("fusion").value);
  if ($("fusion").value === "weighted") {
    for (const id of ["image_weight", "text_weight", "lexical_weight"]) add(id, $(id).value || "0");
  }
  add("lexical", $("lexical").checked ? "true" : "false");
  const limit = Math.min(100, Math.max(1, Number.parseInt($("limit").value, 10) || 12));
  add("limit", String(limit));
  return { fields, photo: state.photo, limit, catalogue: $("catalogue").value };
}

async function runSearch(query, offset) {
  const turn = ++state.searchTurn;
  const form = new FormData();
  for (const [name, value] of query.fields) form.append(name, value);
  if (query.photo) form.append("image", query.photo, query.photo.name || "pasted.png");
  form.append("offset", String(offset));
  showError("");
  say(offset ? "Loading the next results…" : "Searching…");
  $("submit").disabled = true;
  $("results").setAttribute("aria-busy", "true");
  try {
    let response;
    try {
      response = await fetch("/search", { method: "POST", body: form });
    } catch (e) {
      if (turn === state.searchTurn) clearResults(NO_ANSWER);
      return;
    }
    const message = response.ok ? null : await problem(response);
    if (turn !== state.searchTurn) return;
    if (message) {
      clearResults(message);
      return;
    }
    const body = await response.json();
    state.query = query;
    state.offset = offset;
    renderResults(body);
  } finally {
    if (turn === state.searchTurn) {
      $("submit").disabled = false;
      $("results").removeAttribute("aria-busy");
    }
  }
}

function clearResults(message) {
  $("results").replaceChildren();
  $("pager").hidden = true;
  say("");
  showError(message);
}

function scoreLabel(body) {
  if (body.modes.length > 1) return `fused by ${FUSION_NAMES[body.fusion] || body.fusion}`;
  return body.modes[0] === "lexical" ? "words share" : `${MODE_NAMES[body.modes[0]] || body.modes[0]} cosine`;
}

function renderResults(body) {
  const list = $("results");
  const label = scoreLabel(body);
  list.replaceChildren(...body.results.map((r, i) => card(r, state.offset + i + 1, label)));
  const count = body.results.length;
  const by = body.modes.map((m) => MODE_NAMES[m] || m).join(" + ");
  const fused = body.modes.length > 1 && body.fusion ? ` fused by ${FUSION_NAMES[body.fusion] || body.fusion}` : "";
  if (count) say(`${count} results from ${body.catalogue} by ${by}${fused}.`);
  else say(state.offset ? "No more results." : "No product matches this search and these filters.");
  $("status").title = `answered in ${Math.round(body.took_ms)} ms`; // a tooltip: the page itself stays the same run to run
  const limit = state.query.limit;
  const pager = $("pager");
  pager.hidden = state.offset === 0 && count < limit;
  $("prev").disabled = state.offset === 0;
  $("next").disabled = count < limit || state.offset + limit > MAX_OFFSET;
  const page = Math.floor(state.offset / limit) + 1;
  $("page-info").textContent = count
    ? `Page ${page}: results ${state.offset + 1}–${state.offset + count}`
    : `Page ${page}: no results`;
}

function photoOf(product, className) {
  if (!product.image_urls.length) return el("div", { class: `${className} no-photo`, text: "no photo" });
  return el("img", { class: className, src: product.image_urls[0], alt: product.title || product.id, loading: "lazy" });
}

function bars(scores) {
  const box = el("div", { class: "bars" });
  for (const [key, label] of MODALITIES) {
    const value = scores[key];
    if (value === null || value === undefined) continue;
    const width = Math.round(Math.max(0, Math.min(1, value)) * 100);
    box.append(
      el("div", { class: "bar", title: `${label} similarity ${value.toFixed(3)}` },
        el("span", { class: "bar-label", text: label }),
        el("span", {
          class: "track", role: "meter", "aria-label": `${label} similarity`,
          "aria-valuemin": "0", "aria-valuemax": "1", "aria-valuenow": value.toFixed(3),
        }, el("span", { class: "fill", style: `width: ${width}%` })),
        el("span", { class: "bar-value", text: value.toFixed(2) })),
    );
  }
  return box;
}

function card(result, rank, label) {
  const p = result.product;
  const button = el("button", { type: "button", class: "secondary", text: "Same product elsewhere" });
  button.addEventListener("click", () => openMatches(p, button));
  return el("li", { class: "card" },
    el("span", { class: "rank", text: `#${rank}` }),
    photoOf(p, "card-photo"),
    el("h3", { class: "title", text: p.title || p.id }),
    el("p", { class: "meta" },
      el("span", { class: "retailer-name", text: result.retailer }), " · ",
      el("span", { class: "price", text: formatPrice(p) })),
    el("p", { class: "meta category", text: p.category_path || "no category" }),
    el("p", { class: "score" }, "score ", el("strong", { text: result.score.toFixed(3) }), el("small", { text: ` ${label}` })),
    bars(result.scores),
    button,
  );
}

// ---------------------------------------------------------------- same product elsewhere

function matchesSay(message) {
  $("matches-status").textContent = message;
}

function matchesError(message) {
  $("matches-error").textContent = message || "";
  $("matches-error").hidden = !message;
}

// Why the decisions are unreliable (such a match model never says "match") or missing.
function matchesWarning(message, calibrated) {
  const lead = calibrated ? "Decisions unreliable" : "No decisions";
  $("matches-warning").textContent = message ? `${lead}: ${message}.` : "";
  $("matches-warning").hidden = !message;
}

async function openMatches(product, opener) {
  const turn = ++state.matchesTurn;
  const dialog = $("matches");
  state.opener = opener;
  $("matches-source").replaceChildren(
    photoOf(product, "source-photo"),
    el("div", {},
      el("strong", { text: product.title || product.id }),
      el("div", { class: "meta", text: `${product.retailer} · id ${product.id} · ${formatPrice(product)}` })),
  );
  $("matches-list").replaceChildren();
  matchesError("");
  matchesWarning("", false);
  matchesSay("Looking for it in the other shops…");
  if (!dialog.open) dialog.showModal();
  const catalogue = state.query ? state.query.catalogue : $("catalogue").value;
  const url = `/catalogues/${encodeURIComponent(catalogue)}/products/${encodeURIComponent(product.retailer)}`
    + `/${encodeURIComponent(product.id)}/matches?limit=${MATCHES_SHOWN}`;
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    if (turn === state.matchesTurn) { matchesSay(""); matchesError(NO_ANSWER); }
    return;
  }
  const message = response.ok ? null : await problem(response);
  if (turn !== state.matchesTurn) return;
  if (message) {
    matchesSay("");
    matchesError(message);
    return;
  }
  const body = await response.json();
  $("matches-list").replaceChildren(...body.matches.map(matchItem));
  const n = body.matches.length;
  matchesWarning(body.warning, body.calibrated);
  const calibrated = body.calibrated || body.warning ? "" : " Decisions need a calibration first (python -m ingest calibrate).";
  matchesSay(n ? `${n} candidates in other shops, best first.${calibrated}` : "No candidate in any other shop of this catalogue.");
}

function percent(p) {
  if (p === null || p === undefined) return "n/a"; // no calibration yet
  if (p < 0.01) return "< 1 %";
  if (p > 0.99) return "> 99 %";
  return `${Math.round(p * 100)} %`;
}

function matchItem(m) {
  const p = m.product;
  const confidence = `confidence ${percent(m.confidence)}`;
  return el("li", { class: "match" },
    photoOf(p, "match-photo"),
    el("div", { class: "match-body" },
      el("div", { class: "match-head" },
        el("strong", { class: "title", text: p.title || p.id }),
        el("span", { class: `decision decision-${m.decision}`, text: DECISIONS[m.decision] || m.decision })),
      el("div", { class: "meta" },
        el("span", { class: "retailer-name", text: m.retailer }), " · ",
        el("span", { class: "price", text: formatPrice(p) }), " · ",
        el("span", { class: "category", text: p.category_path || "no category" })),
      el("div", { class: "meta" }, el("span", { class: "confidence", text: confidence }), ` · score ${m.score.toFixed(3)}`),
      bars(m.scores)),
  );
}

// ---------------------------------------------------------------- the review tab

const review = {
  pairs: [], // the queue's pairs still to show
  current: null,
  skipped: new Set(), // left ids skipped this session: not asked again until the page is reloaded
  answered: 0,
  busy: false,
};

function showTab(name) {
  for (const tab of ["search", "review"]) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`${tab}-view`).hidden = !selected;
  }
  if (name === "review" && !review.current && !review.busy) loadReview();
}

function reviewSay(message) {
  $("review-status").textContent = message;
}

function reviewError(message) {
  $("review-error").textContent = message || "";
  $("review-error").hidden = !message;
}

function fillReviewRetailers() {
  const info = state.catalogues[$("review-catalogue").value];
  const names = Object.keys(info ? info.retailers : {}).sort((a, b) => a.localeCompare(b));
  $("review-retailer").replaceChildren(...names.map((name) => new Option(`${name} (${info.retailers[name]})`, name)));
  review.pairs = [];
  review.current = null;
  $("review-pair").hidden = true;
}

function writeHeaders() {
  const key = $("review-key").value;
  return key ? { "Content-Type": "application/json", "X-API-Key": key } : { "Content-Type": "application/json" };
}

function reviewBase() {
  return `/catalogues/${encodeURIComponent($("review-catalogue").value)}`;
}

async function loadReview() {
  const retailer = $("review-retailer").value;
  if (!retailer) {
    reviewSay("This catalogue has no products yet.");
    return;
  }
  review.busy = true;
  reviewError("");
  reviewSay("Choosing the pairs whose answers teach most…");
  const params = new URLSearchParams({ retailer, limit: "10" });
  for (const id of review.skipped) params.append("skip", id);
  let response;
  try {
    response = await fetch(`${reviewBase()}/review?${params}`);
  } catch (e) {
    review.busy = false;
    reviewSay("");
    reviewError(NO_ANSWER);
    return;
  }
  review.busy = false;
  if (!response.ok) {
    reviewSay("");
    reviewError(await problem(response));
    return;
  }
  const body = await response.json();
  review.pairs = body.pairs;
  $("review-counter").textContent = `${body.labels} labels stored for ${$("review-catalogue").value}`;
  const model = body.model === "catalogue" ? "this catalogue's own match model" : body.model === "default"
    ? "the default match model (not fitted on your data)" : "no match model yet";
  reviewSay(body.pairs.length ? `${body.pairs.length} pairs to judge, chosen by ${model}.` : "Nothing left to ask about this shop.");
  nextPair();
}

function side(product) {
  const ids = [product.mpn && `model ${product.mpn}`, product.gtin && `GTIN ${product.gtin}`, `id ${product.id}`].filter(Boolean);
  return [
    photoOf(product, "card-photo"),
    el("h3", { text: product.title || product.id }),
    el("p", { class: "meta" },
      el("span", { class: "retailer-name", text: product.retailer }), " · ",
      el("span", { class: "price", text: formatPrice(product) }),
      product.brand ? ` · ${product.brand}` : ""),
    el("p", { class: "meta", text: ids.join(" · ") }),
    el("p", { class: "meta category", text: product.category_path || "no category" }),
  ];
}

function nextPair() {
  review.current = review.pairs.shift() || null;
  const pair = review.current;
  $("review-pair").hidden = !pair;
  if (!pair) {
    if (review.answered) loadReview();
    return;
  }
  $("review-left").replaceChildren(...side(pair.left));
  $("review-right").replaceChildren(...(pair.right ? side(pair.right)
    : [el("p", { class: "meta", text: "No candidate in the other shops. Does this product have a counterpart there?" })]));
  const decision = pair.decision ? ` · ${DECISIONS[pair.decision] || pair.decision}` : "";
  $("review-probability").textContent = `same product: ${percent(pair.probability)}${decision}`;
  $("review-why").replaceChildren(...pair.why.map((reason) => el("li", { text: reason })));
  $("review-signals").replaceChildren(
    ...pair.agree.map((s) => el("li", { class: "agree", text: `+ ${s}` })),
    ...pair.disagree.map((s) => el("li", { class: "disagree", text: `− ${s}` })),
  );
  $("answer-same").disabled = $("answer-different").disabled = !pair.right;
}

async function answer(kind) {
  const pair = review.current;
  if (!pair || review.busy) return;
  if (kind === "skip") {
    review.skipped.add(pair.left.id);
    reviewSay("Skipped.");
    nextPair();
    return;
  }
  if (!pair.right && kind !== "none") return;
  const body = {
    left: { retailer: pair.left.retailer, id: pair.left.id },
    right: kind === "none" ? null : { retailer: pair.right.retailer, id: pair.right.id },
    same: kind === "same",
    who: "page",
  };
  const response = await reviewWrite("labels", body);
  if (!response) return;
  review.answered += 1;
  const stored = $("review-counter").textContent.match(/^(\d+)/);
  const total = (stored ? Number(stored[1]) : 0) + (response.status === 201 ? 1 : 0);
  $("review-counter").textContent = `${total} labels stored for ${$("review-catalogue").value}`;
  reviewSay(kind === "same" ? "Saved: same product." : kind === "none" ? "Saved: no counterpart." : "Saved: different products.");
  nextPair();
}

function figures(j) {
  const decided = j.precision === null ? "decides no match" : `precision ${j.precision.toFixed(3)}, recall ${j.recall.toFixed(3)}`;
  return el("tr", {}, el("td", { text: j.label }), el("td", { text: String(j.products) }), el("td", { text: decided }));
}

// POST a review write (a label, a training) with the API key when one is typed; the answer when it is a 2xx,
// else null with the problem shown.
async function reviewWrite(path, body) {
  let response;
  try {
    response = await fetch(`${reviewBase()}/${path}`, { method: "POST", headers: writeHeaders(), body: JSON.stringify(body) });
  } catch (e) {
    reviewError(NO_ANSWER);
    return null;
  }
  if (!response.ok) {
    reviewError(await problem(response));
    return null;
  }
  reviewError("");
  return response;
}

async function train() {
  const box = $("review-training");
  const response = await reviewWrite("train", {});
  if (!response) return;
  const job = await response.json();
  $("review-train").disabled = true;
  box.hidden = false;
  box.replaceChildren(el("p", { text: "Training on your answers…" }));
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 500));
    let polled;
    try {
      polled = await (await fetch(`/jobs/${job.id}`)).json();
    } catch (e) {
      continue;
    }
    if (!["done", "failed", "interrupted"].includes(polled.status)) continue;
    $("review-train").disabled = false;
    if (polled.status !== "done") {
      box.replaceChildren(el("p", { class: "error", text: `Training ${polled.status}: ${polled.error || ""}` }));
      return;
    }
    const t = polled.training;
    const verdict = t.chosen
      ? `"${t.chosen}" is now this catalogue's match model: it did better on labelled products it never learnt from.`
      : "Nothing trained did better than the model in use on labelled products it never learnt from: it stays.";
    box.replaceChildren(
      el("p", { class: "verdict-line", text: `Trained on ${t.labels} labelled products in ${t.seconds} s. ${verdict}` }),
      el("table", {},
        el("thead", {}, el("tr", {}, el("th", { text: "model" }), el("th", { text: "held-out products" }), el("th", { text: "on them" }))),
        el("tbody", {}, figures(t.before), ...t.tried.map(figures))),
      ...t.notes.map((note) => el("p", { class: "hint", text: note })),
    );
    review.pairs = [];
    loadReview(); // the next pairs are chosen by the new model's doubts
    return;
  }
}

// ---------------------------------------------------------------- wiring

function init() {
  const form = $("search-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch(readForm(), 0);
  });
  // Enter searches from any field (selects and checkboxes included), not only from text boxes.
  form.addEventListener("keydown", (event) => {
    const t = event.target;
    if (event.key !== "Enter" || event.defaultPrevented || event.isComposing) return;
    if ((t.tagName === "SELECT") || (t.tagName === "INPUT" && t.type === "checkbox")) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  $("prev").addEventListener("click", () => {
    if (state.query) runSearch(state.query, Math.max(0, state.offset - state.query.limit));
  });
  $("next").addEventListener("click", () => {
    if (state.query) runSearch(state.query, state.offset + state.query.limit);
  });

  const drop = $("drop");
  drop.addEventListener("click", pickPhoto);
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      pickPhoto();
    } else if (event.key === "Delete" || event.key === "Backspace") {
      if (state.photo) { event.preventDefault(); setPhoto(null); }
    }
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) setPhoto(file, "dropped");
  });
  // A file dropped next to the zone must not make the browser leave the page to show it.
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => event.preventDefault());
  document.addEventListener("paste", (event) => {
    const file = [...((event.clipboardData && event.clipboardData.files) || [])].find((f) => f.type.startsWith("image/"));
    if (file) {
      event.preventDefault();
      setPhoto(file, "pasted");
    }
  });
  $("image").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) setPhoto(file, "chosen");
    event.target.value = ""; // choosing the same file again still fires "change"
  });
  $("preview").addEventListener("error", () => {
    if (!state.photo) return;
    $("preview").hidden = true;
    $("drop-hint").textContent = `${state.photo.name || "this file"}: no preview (the service will check it)`;
  });
  $("clear-image").addEventListener("click", () => {
    setPhoto(null);
    say("Photo removed.");
    drop.focus();
  });

  $("catalogue").addEventListener("change", fillFacets);
  $("fusion").addEventListener("change", syncWeights);
  syncWeights();

  const dialog = $("matches");
  $("close-matches").addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close(); // a click on the backdrop
  });
  dialog.addEventListener("close", () => {
    state.matchesTurn++;
    if (state.opener && state.opener.isConnected) state.opener.focus();
  });

  $("tab-search").addEventListener("click", () => showTab("search"));
  $("tab-review").addEventListener("click", () => showTab("review"));
  for (const [tab, other] of [["search", "review"], ["review", "search"]]) {
    $(`tab-${tab}`).addEventListener("keydown", (event) => {
      if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
      event.preventDefault();
      showTab(other);
      $(`tab-${other}`).focus();
    });
  }
  $("review-catalogue").addEventListener("change", fillReviewRetailers);
  $("review-retailer").addEventListener("change", fillReviewRetailers);
  $("review-form").addEventListener("submit", (event) => {
    event.preventDefault();
    review.pairs = [];
    loadReview();
  });
  $("review-train").addEventListener("click", train);
  const answers = { s: "same", d: "different", n: "none", k: "skip" };
  $("answer-same").addEventListener("click", () => answer("same"));
  $("answer-different").addEventListener("click", () => answer("different"));
  $("answer-none").addEventListener("click", () => answer("none"));
  $("answer-skip").addEventListener("click", () => answer("skip"));
  document.addEventListener("keydown", (event) => {
    if ($("review-view").hidden || event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    const t = event.target;
    if (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA") return;
    const kind = answers[event.key.toLowerCase()];
    if (kind) {
      event.preventDefault();
      answer(kind);
    }
  });

  loadCatalogues();
}

init();
