"use strict";
// clipforge search page: plain JS against the JSON API of the same server (see /docs).
const $ = (id) => document.getElementById(id);
let health = { modalities: ["image"], size: {}, max_k: 1000 };
const LABELS = { image: "images", text: "captions" };

function setStatus(text, isError = false, queryImage = null) {
  $("status").classList.toggle("error", isError);
  $("status-text").textContent = text;
  const img = $("query-image");
  if (queryImage !== undefined) {
    img.hidden = !queryImage;
    if (queryImage) img.src = queryImage;
  }
}

function errorMessage(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return `${status}: ${detail}`;
  if (Array.isArray(detail)) return `${status}: ` + detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
  return `${status}: request failed`;
}

async function callApi(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error(errorMessage(response.status, body));
  return body;
}

function settings() {
  const modality = $("modality").value || health.modalities[0];
  const size = health.size[modality] || health.max_k;
  const k = Math.max(1, Math.min(parseInt($("k").value, 10) || 20, size, health.max_k));
  $("k").value = k;
  return { modality, k };
}

function render(data, label) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of data.hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.tabIndex = 0;
    card.dataset.id = hit.id;
    card.title = "find similar";
    if (hit.image_url) {
      const img = document.createElement("img");
      img.src = hit.image_url;
      img.alt = hit.caption || `row ${hit.id}`;
      card.append(img);
    } else {
      const none = document.createElement("div");
      none.className = "no-image";
      none.textContent = hit.image_path || "no image";
      card.append(none);
    }
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score === null ? "" : hit.score.toFixed(3);
    caption.append(score, document.createTextNode(hit.caption || hit.image_path || `#${hit.id}`));
    card.append(caption);
    const similar = () => searchId(hit.id, hit.image_url);
    card.addEventListener("click", similar);
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") similar(); });
    grid.append(card);
  }
  return `${data.hits.length} ${LABELS[data.modality] || data.modality} ${label}`;
}

async function run(label, url, options, queryImage = null) {
  document.body.dataset.state = "busy";
  setStatus(`searching ${label}…`, false, queryImage);
  try {
    const data = await callApi(url, options);
    setStatus(render(data, label), false, queryImage);
    document.body.dataset.state = "done";
  } catch (err) {
    setStatus(err.message, true, null);
    document.body.dataset.state = "error";
  }
}

function searchText(query) {
  const { modality, k } = settings();
  const params = new URLSearchParams({ q: query, k, modality });
  return run(`for “${query}”`, `search?${params}`);
}

function searchId(id, imageUrl) {
  const { modality, k } = settings();
  return run(`similar to #${id}`, `search/id/${id}?${new URLSearchParams({ k, modality })}`, undefined, imageUrl || null);
}

function searchImage(file) {
  if (!file) return;
  if (file.size > health.max_upload_bytes) {
    setStatus(`${file.name} is ${file.size} bytes, over the limit of ${health.max_upload_bytes}`, true, null);
    return;
  }
  const { modality, k } = settings();
  const form = new FormData();
  form.append("file", file);
  form.append("k", k);
  form.append("modality", modality);
  return run(`like ${file.name}`, "search/image", { method: "POST", body: form }, URL.createObjectURL(file));
}

async function init() {
  try {
    health = await callApi("health");
  } catch (err) {
    setStatus(`server not ready: ${err.message}`, true);
  }
  const select = $("modality");
  for (const m of health.modalities) {
    const option = document.createElement("option");
    option.value = m;
    option.textContent = LABELS[m] || m;
    select.append(option);
  }
  $("info").textContent = health.modalities.map((m) => `${health.size[m]} ${LABELS[m] || m}`).join(", ");
  $("k").max = health.max_k;
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const query = $("query").value.trim();
    if (!query) { setStatus("type something to search for", true, null); return; }
    searchText(query);
  });
  $("upload").addEventListener("change", (e) => { searchImage(e.target.files[0]); e.target.value = ""; });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    const file = [...(e.dataTransfer.files || [])].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0];
    searchImage(file);
  });
  document.body.dataset.state = "ready";
}

init();
