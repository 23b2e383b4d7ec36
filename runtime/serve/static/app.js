// hallolive-rt live page: one session per start, over a WebSocket (protocol v1, see the README: the fMP4 it
// sends appended to one MediaSource SourceBuffer, an ack after each block's fragment is appended) or over
// WebRTC (a video and an audio track played as they come, the same messages on a data channel, an ack per
// block event).
"use strict";

const PROTOCOL = 1;
const $ = (id) => document.getElementById(id);
const video = $("video");
const params = new URLSearchParams(location.hash.slice(1) || location.search.slice(1));
const token = params.get("token");

// state of the current session; window.hallolive lets a test (or a curious user) read it
const state = { events: [], errors: [], appended: 0, acked: -1, prompts: {}, ended: false };
window.hallolive = state;
let ws = null, ms = null, sb = null, pc = null, dc = null, rtc = { webrtc: false, ice_servers: [] };
let queue = [];        // binaries waiting for the SourceBuffer: {data, block}
let current = null;    // the one being appended
let expect = null;     // the event that announced the next binary (init, block, tail)
let clickedAt = 0;

function fmt(x, unit, digits = 2) { return x == null ? "–" : `${x.toFixed(digits)}${unit}`; }
function status(text, bad = false) { const s = $("status"); s.textContent = text; s.classList.toggle("error", bad); }
function log(text, bad = false) {
  const li = document.createElement("li");
  li.textContent = text;
  if (bad) li.className = "error";
  const ol = $("log");
  ol.prepend(li);
  while (ol.children.length > 40) ol.lastChild.remove();
}
function fail(text) { state.errors.push(text); log(text, true); status(text, true); }
function send(msg) {
  const text = JSON.stringify({ v: PROTOCOL, ...msg });
  if (dc && dc.readyState === "open") dc.send(text);
  else if (ws && ws.readyState === WebSocket.OPEN) ws.send(text);
}
function setRunning(on) {
  $("start").disabled = on; $("stop").disabled = !on; $("switch").disabled = !on;
}

function wsUrl() {
  const u = new URL("/ws", location.href);
  u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token) u.searchParams.set("token", token);
  return u.href;
}

function startMessage() {
  const blocks = $("blocks").value ? Number($("blocks").value) : null;
  return { type: "start", prompt: $("prompt").value, seed: Number($("seed").value || 0), blocks,
           future_audio_frames: null };
}

function start() {
  Object.assign(state, { events: [], errors: [], appended: 0, acked: -1, prompts: {}, ended: false,
                         transport: $("transport").value, framesRendered: 0, firstFrameMs: null });
  queue = []; current = null; expect = null; sb = null;
  for (const id of ["ttff", "fps", "gap", "block", "queue", "prompt-id"]) $(id).textContent = "–";
  setRunning(true);
  status("opening…");
  clickedAt = performance.now();
  if (state.transport === "webrtc") { startRtc().catch((err) => fail(`WebRTC: ${err}`)); return; }
  video.srcObject = null;
  ms = new MediaSource();
  video.src = URL.createObjectURL(ms);
  ms.addEventListener("sourceopen", openSocket, { once: true });
}

function openSocket() {
  ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  ws.onopen = () => send(startMessage());
  ws.onmessage = (e) => (typeof e.data === "string" ? onEvent(JSON.parse(e.data)) : onBinary(e.data));
  ws.onclose = (e) => {
    setRunning(false);
    log(`closed: ${e.code}${e.reason ? " " + e.reason : ""}`, e.code !== 1000);
    if (e.code !== 1000 && !state.errors.length) fail(`connection closed (${e.code} ${e.reason})`);
    else if (e.code === 1000) status(state.ended ? "ended" : "closed");
  };
}

// WebRTC: offer (host candidates gathered), answer from POST /webrtc/offer, tracks into the video element
async function startRtc() {
  pc = new RTCPeerConnection({ iceServers: rtc.ice_servers.map((u) => ({ urls: u })) });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  dc = pc.createDataChannel("control");
  const stream = new MediaStream();
  video.src = "";
  video.srcObject = stream;
  pc.ontrack = (e) => {
    stream.addTrack(e.track);
    if (e.track.kind === "video") video.play().catch((err) => fail(`play(): ${err}`));
  };
  dc.onopen = () => send(startMessage());
  dc.onmessage = (e) => {
    const ev = JSON.parse(e.data);
    if (ev.type === "close") { endRtc(ev.code, ev.reason); return; }
    onEvent(ev);
    if (ev.type === "block") { send({ type: "ack", block: ev.index }); state.acked = ev.index; }
  };
  pc.onconnectionstatechange = () => {
    if (pc && pc.connectionState === "failed") endRtc(1006, "peer connection failed");
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    setTimeout(resolve, 2000);  // what was gathered by then (host candidates come at once)
  });
  const r = await fetch("/webrtc/offer", {
    method: "POST", body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
    headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
  });
  const answer = await r.json();
  if (!r.ok) { onEvent(answer); endRtc(r.status === 503 ? 1013 : 4400, answer.code || "refused"); return; }
  await pc.setRemoteDescription(answer);
  video.requestVideoFrameCallback(onRendered);
}

function onRendered(now, meta) {  // WebRTC: TTFF is the first frame rendered
  state.framesRendered = meta.presentedFrames;
  if (state.firstFrameMs == null) {
    state.firstFrameMs = now - clickedAt;
    $("ttff").textContent = fmt(state.firstFrameMs / 1000, " s");
  }
  if (pc) video.requestVideoFrameCallback(onRendered);
}

function endRtc(code, reason) {
  setRunning(false);
  log(`closed: ${code}${reason ? " " + reason : ""}`, code !== 1000);
  if (code !== 1000 && !state.errors.length) fail(`connection closed (${code} ${reason})`);
  else if (code === 1000) status(state.ended ? "ended" : "closed");
  setTimeout(() => { if (pc) pc.close(); pc = dc = null; }, 1000);  // the last frames in flight play out
}

function onEvent(ev) {
  state.events.push(ev);
  switch (ev.type) {
    case "hello":
      $("server").textContent = `replica ${ev.replica}${ev.replicas > 1 ? ` (of ${ev.replicas})` : ""} · ` +
        `${ev.active_sessions}/${ev.max_sessions} sessions · ` +
        `${ev.profile.preset} ${ev.profile.width}×${ev.profile.height} @ ${ev.profile.fps} fps`;
      break;
    case "busy":
      fail(`busy: ${ev.message}`);
      break;
    case "started":
      status(`streaming (session ${ev.session}, ${ev.blocks == null ? "endless" : ev.blocks + " blocks"})`);
      $("prompt-id").textContent = "#0";
      break;
    case "init":
      try {
        sb = ms.addSourceBuffer(ev.mime);
        sb.mode = "segments";  // the fragments carry exact timestamps: audio and video stay in sync
        sb.addEventListener("updateend", onAppended);
        sb.addEventListener("error", () => fail("SourceBuffer error"));
      } catch (err) { fail(`cannot play ${ev.mime}: ${err}`); }
      expect = ev;
      break;
    case "block":
      expect = ev;
      $("block").textContent = String(ev.index);
      $("queue").textContent = String(ev.queue);
      $("prompt-id").textContent = `#${ev.prompt_id}`;
      if (ev.index === 0 && state.transport !== "webrtc") $("ttff").textContent = fmt(ev.ttff_s, " s");
      if (ev.fps != null) $("fps").textContent = fmt(ev.fps, "", 1);
      if (ev.gap_s != null) $("gap").textContent = fmt(ev.gap_s * 1000, " ms", 0);
      break;
    case "tail":
      expect = ev;
      break;
    case "prompt_queued":
      state.prompts[ev.prompt_id] = { queued: true };
      log(`prompt #${ev.prompt_id} queued`);
      break;
    case "prompt_applied":
      state.prompts[ev.prompt_id] = { from_block: ev.from_block };
      log(`prompt #${ev.prompt_id} from block ${ev.from_block}`);
      break;
    case "end":
      state.ended = true;
      log(`end (${ev.reason}): ${ev.blocks} blocks, ${ev.frames} frames, ${ev.video_s.toFixed(2)} s`);
      if (state.transport !== "webrtc") pump();
      break;
    case "error":
      fail(`${ev.code}: ${ev.message}`);
      break;
    default:
      log(`unknown event ${ev.type}`);
  }
  if (["hello", "started", "init", "busy"].includes(ev.type)) log(ev.type === "hello" ? "connected" : ev.type);
}

function onBinary(data) {
  const block = expect && expect.type === "block" ? expect.index : null;
  if (!expect || data.byteLength !== expect.bytes) fail(`unexpected binary message of ${data.byteLength} bytes`);
  expect = null;
  queue.push({ data, block });
  pump();
}

function pump() {
  if (!sb || sb.updating || current) return;
  if (!queue.length) {
    if (state.ended && ms.readyState === "open") ms.endOfStream();
    return;
  }
  current = queue.shift();
  try {
    sb.appendBuffer(current.data);
  } catch (err) {
    fail(`appendBuffer: ${err}`);
  }
}

function onAppended() {
  if (current) {
    state.appended += 1;
    if (current.block != null) { send({ type: "ack", block: current.block }); state.acked = current.block; }
    current = null;
  }
  const b = sb.buffered;
  if (b.length) {
    if (video.paused && !state.playRequested) {
      state.playRequested = true;
      if (video.currentTime < b.start(0)) video.currentTime = b.start(0);
      video.play().catch((err) => fail(`play(): ${err}`));
    }
    // an endless stream: keep 30 s behind the playhead, so the buffer never fills up
    if (!sb.updating && video.currentTime - b.start(0) > 60) { sb.remove(b.start(0), video.currentTime - 30); return; }
  }
  pump();
}

video.addEventListener("playing", () => {
  if (!state.firstPlayingMs) state.firstPlayingMs = performance.now() - clickedAt;
});
video.addEventListener("error", () => {
  const e = video.error;
  fail(`video error: ${e ? e.message || e.code : "?"}`);
});
setInterval(() => {
  $("time").textContent = fmt(video.currentTime, " s");
  const b = sb && ms && ms.readyState !== "closed" && state.transport !== "webrtc" ? sb.buffered : null;
  $("buffered").textContent = b && b.length ? fmt(b.end(b.length - 1), " s") : "–";
}, 200);

$("start").addEventListener("click", () => { state.playRequested = false; start(); });
$("stop").addEventListener("click", () => send({ type: "stop" }));
$("switch").addEventListener("click", () => send({ type: "prompt", prompt: $("switch-prompt").value }));
fetch("/webrtc").then((r) => r.json()).then((info) => {
  rtc = info;
  const opt = document.querySelector('#transport option[value="webrtc"]');
  opt.disabled = !info.webrtc;
  if (!info.webrtc) opt.textContent += " (serve --webrtc)";
}).catch(() => {});
fetch("/health").then((r) => r.json()).then((h) => {
  $("server").textContent =
    `replica ${h.replica} · ${h.active_sessions}/${h.max_sessions} sessions · protocol v${h.protocol}`;
}).catch(() => {});
