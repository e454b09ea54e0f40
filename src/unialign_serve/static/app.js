"use strict";
// The unialign page: text search over the index and zero-shot classification of an uploaded image.
const $ = (id) => document.getElementById(id);
let chosenFile = null;

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function callApi(url, options) {
  const res = await fetch(url, options);
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error((body && body.error) || `request failed (${res.status})`);
  return body;
}

function showResults(data, title) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of data.results) {
    const tile = document.createElement("figure");
    tile.className = "tile";
    tile.dataset.label = hit.label;
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const img = document.createElement("img");
    img.src = hit.url;
    img.alt = hit.label || hit.id;
    img.loading = "lazy";
    const label = document.createElement("figcaption");
    label.className = "label";
    label.textContent = hit.label || hit.id;
    label.title = `${hit.label} (${hit.id})`;
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `cosine ${hit.score.toFixed(3)}`;
    tile.append(rank, img, label, score);
    grid.append(tile);
  }
  setStatus("search-status", `${data.results.length} images for ${title}`);
}

async function search(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) { setStatus("search-status", "Type something to search for.", true); return; }
  setStatus("search-status", "Searching…");
  try {
    const data = await callApi(`/search?q=${encodeURIComponent(q)}&k=${$("k").value}`);
    showResults(data, `“${q}”`);
  } catch (e) {
    $("results").replaceChildren();
    setStatus("search-status", e.message, true);
  }
}

function chooseFile(file) {
  if (!file) return;
  chosenFile = file;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = file.name;
  setStatus("classify-status", "");
  $("ranking").replaceChildren();
}

async function classify() {
  if (!chosenFile) { setStatus("classify-status", "Choose an image first.", true); return; }
  const labels = $("labels").value.split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
  if (!labels.length) { setStatus("classify-status", "Type some labels, separated by commas.", true); return; }
  const form = new FormData();
  form.append("file", chosenFile);
  form.append("labels", labels.join(","));
  setStatus("classify-status", "Classifying…");
  try {
    const data = await callApi("/classify", { method: "POST", body: form });
    const list = $("ranking");
    list.replaceChildren();
    for (const item of data.labels) {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = item.label;
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(1, item.score * 100).toFixed(1)}%`;
      bar.append(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = `${(item.score * 100).toFixed(1)}%`;
      li.append(name, bar, pct);
      list.append(li);
    }
    setStatus("classify-status", `Best match: ${data.labels[0].label}`);
  } catch (e) {
    $("ranking").replaceChildren();
    setStatus("classify-status", e.message, true);
  }
}

async function similar() {
  if (!chosenFile) { setStatus("classify-status", "Choose an image first.", true); return; }
  const form = new FormData();
  form.append("file", chosenFile);
  setStatus("search-status", "Searching…");
  try {
    const data = await callApi(`/search/image?k=${$("k").value}`, { method: "POST", body: form });
    showResults(data, `images like ${chosenFile.name}`);
    $("search-card").scrollIntoView({ behavior: "smooth" });
  } catch (e) {
    setStatus("search-status", e.message, true);
  }
}

async function init() {
  $("search-form").addEventListener("submit", search);
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); chooseFile(e.dataTransfer.files[0]); });
  $("classify-button").addEventListener("click", classify);
  $("similar-button").addEventListener("click", similar);
  try {
    const h = await callApi("/health");
    const idx = h.index ? `${h.index.size} images indexed (${h.index.collection})` : "no image index: search is off";
    $("model-info").textContent = `${h.model.image_encoder} + ${h.model.text_encoder} · ${idx}`;
    if (!h.index) {
      $("search-button").disabled = true; $("similar-button").disabled = true;
      setStatus("search-status", "This server was started without --index.");
    }
  } catch (e) {
    $("model-info").textContent = e.message;
  }
  document.body.dataset.ready = "1";
}

init();
