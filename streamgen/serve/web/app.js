// streamgen web client: one live stream over WebRTC, controlled through the `control` data channel.
//
// Signaling (same origin): GET /ice-servers, POST /offer {sdp, type, prompt?, session_id?} → {sdp, type,
// session_id}, GET /sessions/{id} (its prompt and how the model understood it), DELETE /sessions/{id};
// GET /model says which words a closed-vocabulary model (the embedded one) knows. Control messages (JSON, each with an `id` echoed in its reply):
// prompt / params / pause / resume / reset; the server answers ack {of, frame, id, detail?} or error
// {message} (a prompt's ack detail: understood, unknown_words, defaulted — shown as a warning when words
// were ignored),
// and sends stats {fps, latency_ms, frame, queue_depth, paused} about once a second, and stall {frame,
// reason, recovery_s, replaced} when the server recovered from a fault (e.g. a Ray stage replaced).
//
// A dropped connection is re-established with the stored session_id, which resumes the same stream
// while the server's grace period lasts; after that a new session starts with the last prompt.
//
// An avatar model (GET /model has `avatar`) is driven by audio, not text: the page hides the prompt and shows a
// face (the offer's `reference`, a PNG data URL; none: the server's default face), the microphone (sendrecv
// audio on the offer; the server sends the audio that drove the frames back, played beside the video) and a
// speech file pushed over the session's audio WebSocket (/sessions/{id}/audio: PCM s16le, `flush` at the end,
// `clear` to interrupt; the server answers `playback_finished` {position, interrupted}, shown in the log).
// No build step: plain ES module, no dependencies.

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), video: $("stream"), placeholder: $("placeholder"), stats: $("stats"),
  paused: $("paused-badge"), stall: $("stall"), form: $("prompt-form"), prompt: $("prompt"), send: $("send"),
  chunks: $("blend-chunks"), interp: $("blend-interp"), connect: $("connect"), disconnect: $("disconnect"),
  pause: $("pause"), resume: $("resume"), reset: $("reset"), token: $("token"), codec: $("codec"),
  log: $("log"), clearLog: $("clear-log"), promptHelp: $("prompt-help"), vocabulary: $("vocabulary"),
  settings: $("settings"), avatar: $("avatar"), face: $("face"), referenceFile: $("reference-file"),
  referencePreview: $("reference-preview"), microphone: $("microphone"), sound: $("sound"),
  speechFile: $("speech-file"), speak: $("speak"), interrupt: $("interrupt"),
};
const stat = Object.fromEntries([...ui.stats.querySelectorAll("[data-stat]")].map((el) => [el.dataset.stat, el]));

const KEY_SESSION = "streamgen.session";
const KEY_RESUME = "streamgen.resume"; // the session's resume token: only this tab may take it over
const KEY_TOKEN = "streamgen.token";
const LOG_LIMIT = 300;
const LOG_PROMPT_CHARS = 80; // a prompt quoted in the log is cut to this many characters
const RECONNECT_DELAYS_MS = [300, 700, 1500, 2500, 4000]; // then every 4 s, until RECONNECT_GIVE_UP_MS
const RECONNECT_GIVE_UP_MS = 60_000;
const DISCONNECTED_GRACE_MS = 2500; // ICE "disconnected" this long counts as a drop
const STALL_SHOWN_MS = 10_000; // how long the stall badge stays over the video
const MAX_REFERENCE_FILE_BYTES = 8 * 1024 * 1024; // a face picture file over this is refused before decoding
const REFERENCE_SIDE = 256; // a face is sent as a PNG scaled to this longer side (the model reads 32×32)
const MAX_SPEECH_FILE_BYTES = 64 * 1024 * 1024;
const SPEECH_MESSAGE_S = 0.5; // audio per WebSocket message (the server takes at most 1 s)
const SPEECH_LEAD_S = 2; // how far ahead of real time a speech file is pushed (the server buffers 30 s)

const state = {
  phase: "idle", // idle → connecting → live ⇄ reconnecting → idle
  pc: null,
  channel: null,
  sessionId: sessionStorage.getItem(KEY_SESSION),
  resumeToken: sessionStorage.getItem(KEY_RESUME),
  userClosed: true,
  nextId: 1,
  pending: new Map(), // id → {type, text, sent}
  outbox: [], // controls typed while connecting: sent, in order, when the control channel opens
  acks: [], // every ack received, for tests and curious users
  errors: [],
  stalls: [], // every stall message received
  stallTimer: null,
  stats: null, // the server's latest stats message
  decoded: { frames: 0, at: 0, fps: 0, width: 0, height: 0, codec: "" },
  presented: 0, // frames shown by the <video> (requestVideoFrameCallback)
  reconnect: { attempt: 0, since: 0, timer: null },
  disconnectedTimer: null,
  statsTimer: null,
  noResume: false, // the server ended the session on purpose: do not try to resume it
  model: null, // GET /model, once read
  avatar: {
    info: null, // the model's `avatar` block: set when the server's model is audio-driven
    reference: null, // the face's data URL sent with a new session's offer; null: the server's default
    uploaded: null, // the last uploaded picture's data URL
    microphone: null, // the live microphone track
    sending: false, // this connection sends the microphone (sendrecv audio; else recvonly)
    socket: null, // the session's audio WebSocket (a speech file)
    speech: null, // the file being pushed: {name, samples, sent, started, timer}
    playback: [], // every playback_finished received
  },
};

// --- logging & status ---------------------------------------------------------------------------
/** Add a line to the event log; the same line again (a burst of refusals) bumps a ×N count instead. */
function log(kind, text) {
  const last = ui.log.lastElementChild;
  if (last && last.className === kind && last.dataset.text === text) {
    last.dataset.count = String(Number(last.dataset.count) + 1);
    last.querySelector("span").textContent = `${text} ×${last.dataset.count}`;
    last.querySelector("time").textContent = new Date().toTimeString().slice(0, 8);
    return;
  }
  const item = document.createElement("li");
  item.dataset.text = text;
  item.dataset.count = "1";
  item.className = kind;
  const time = document.createElement("time");
  time.textContent = new Date().toTimeString().slice(0, 8);
  const body = document.createElement("span");
  body.textContent = text; // never innerHTML: prompts and server messages are untrusted text
  item.append(time, body);
  ui.log.append(item);
  while (ui.log.childElementCount > LOG_LIMIT) ui.log.firstElementChild.remove();
  ui.log.scrollTop = ui.log.scrollHeight;
}

/** A prompt as quoted in the log: at most LOG_PROMPT_CHARS characters. */
function quote(text) {
  return `“${text.length > LOG_PROMPT_CHARS ? text.slice(0, LOG_PROMPT_CHARS - 1) + "…" : text}”`;
}

const PHASE_TEXT = { idle: "Not connected", connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting…" };

function setPhase(phase) {
  state.phase = phase;
  ui.status.dataset.state = phase;
  const sid = state.sessionId ? ` · session ${state.sessionId.slice(0, 8)}` : "";
  ui.status.textContent = PHASE_TEXT[phase] + (phase === "idle" ? "" : sid);
  const open = state.channel?.readyState === "open";
  ui.connect.disabled = phase !== "idle";
  ui.disconnect.disabled = phase === "idle";
  ui.reset.disabled = !open;
  syncPauseButtons(Boolean(state.stats?.paused)); // until the first stats message: a stream runs unpaused
  ui.stats.hidden = phase === "idle" || phase === "reconnecting";
  if (phase === "idle") ui.paused.hidden = ui.stall.hidden = true;
  syncSpeechButtons();
}

function syncPauseButtons(paused) {
  const open = state.channel?.readyState === "open";
  ui.pause.disabled = !open || paused;
  ui.resume.disabled = !open || !paused;
  ui.paused.hidden = !paused;
}

// --- HTTP ---------------------------------------------------------------------------------------
class HttpError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function api(method, path, body) {
  const headers = {};
  const token = ui.token.value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new HttpError(0, `cannot reach the server (${err.message})`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data?.error ?? `${response.status} ${response.statusText}`;
    throw new HttpError(response.status, message, Number(response.headers.get("Retry-After")) || 0);
  }
  return data;
}

// --- connection ---------------------------------------------------------------------------------
function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", check);
      clearTimeout(timer);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    const timer = setTimeout(done, timeoutMs); // offer what we have: host candidates come first
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function preferCodec(transceiver, codec) {
  if (!codec || !transceiver.setCodecPreferences || !RTCRtpReceiver.getCapabilities) return;
  const mime = { vp8: "video/VP8", h264: "video/H264" }[codec];
  const codecs = RTCRtpReceiver.getCapabilities("video").codecs;
  const wanted = codecs.filter((c) => c.mimeType === mime);
  if (wanted.length) transceiver.setCodecPreferences([...wanted, ...codecs.filter((c) => c.mimeType === "video/rtx")]);
}

/**
 * Start a stream, or resume `state.sessionId`. `fallbackToNew`: when that session is gone, start a
 * new one (after a drop) instead of stopping (a stored id found at page load).
 */
async function connect({ fallbackToNew = true } = {}) {
  if (state.pc) return;
  state.userClosed = false;
  state.noResume = false;
  const resuming = Boolean(state.sessionId);
  const prompt = ui.prompt.value.trim(); // the prompt as it read at Connect: one typed later is a change
  if (state.phase !== "reconnecting") setPhase("connecting");

  let iceServers = [];
  try {
    iceServers = (await api("GET", "/ice-servers")).iceServers ?? [];
  } catch (err) {
    if (err.status === 401 || (err.status === 0 && !resuming)) return fail(err);
    if (err.status === 0) return dropped(err.message);
    log("warn", `no ICE server list (${err.message}); trying without`);
  }
  const avatarInfo = (await loadModel())?.avatar ?? null;
  if (state.userClosed) return;

  const pc = new RTCPeerConnection({ iceServers });
  state.pc = pc;
  const transceiver = pc.addTransceiver("video", { direction: "recvonly" });
  preferCodec(transceiver, ui.codec.value);
  if (avatarInfo) await addAvatarAudio(pc);
  if (state.pc !== pc) { // disconnected while the microphone was being opened
    if (state.userClosed) releaseMicrophone();
    return;
  }
  const channel = pc.createDataChannel("control", { ordered: true });
  state.channel = channel;
  wire(pc, channel);

  await pc.setLocalDescription(await pc.createOffer());
  await waitForIceGathering(pc, 2000);
  if (state.pc !== pc) return; // disconnected meanwhile

  const body = { sdp: pc.localDescription.sdp, type: "offer" };
  if (resuming) Object.assign(body, { session_id: state.sessionId, resume_token: state.resumeToken, takeover: true });
  else if (avatarInfo && state.avatar.reference) body.reference = state.avatar.reference;
  else if (!avatarInfo && prompt) body.prompt = prompt;

  let answer;
  try {
    answer = await api("POST", "/offer", body);
  } catch (err) {
    if (state.pc !== pc) return;
    teardown();
    if (resuming && err.status === 404) {
      log("warn", `session ${state.sessionId.slice(0, 8)} has ended (${err.message})`);
      forgetSession();
      if (fallbackToNew && !state.userClosed) {
        log("info", "starting a new session" + (prompt ? ` with “${prompt}”` : ""));
        setPhase("connecting");
        return connect();
      }
      return stop();
    }
    if (resuming && (err.status === 0 || err.status >= 500)) return dropped(err.message, err.retryAfter);
    return fail(err);
  }
  if (state.pc !== pc) return;
  rememberSession(answer.session_id, answer.resume_token);
  if (resuming) log("info", `resumed session ${answer.session_id.slice(0, 8)}`);
  else log("info", `session ${answer.session_id.slice(0, 8)} started` + (body.prompt ? ` with ${quote(body.prompt)}` : ""));
  await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  setPhase(state.phase); // refresh the session id in the status line
  showActivePrompt(answer.session_id, resuming);
}

/** Say which prompt the stream runs and how the model understood it (a resumed stream keeps its own). */
async function showActivePrompt(sid, resuming) {
  let view;
  try {
    view = await api("GET", `/sessions/${encodeURIComponent(sid)}`);
  } catch {
    return; // the session ended meanwhile: the connection handlers say so
  }
  if (!view.prompt) return;
  if (resuming && !ui.prompt.value.trim()) ui.prompt.value = view.prompt;
  const detail = view.prompt_detail;
  if (!detail) return log("info", `active prompt ${quote(view.prompt)}`);
  logUnderstood("active prompt", view.prompt, detail, "");
}

/** A prompt as the model understood it: ✓ when every word counted, a warning naming the ignored words. */
function logUnderstood(what, text, detail, tail) {
  const as = detail.understood && detail.understood !== text.trim().toLowerCase() ? ` as ${quote(detail.understood)}` : "";
  const unknown = detail.unknown_words ?? [];
  const defaulted = detail.defaulted ?? [];
  if (!unknown.length) {
    const fill = defaulted.length ? ` (default ${defaulted.join(", ")})` : "";
    return log("ack", `✓ ${what} ${quote(text)}${tail}${as}${fill}`);
  }
  const fill = defaulted.length ? `; ${defaulted.join(", ")} left at the default` : "";
  log("warn", `⚠ ${what} ${quote(text)}${tail}${as}: the model does not know ${unknown.map((w) => `“${w}”`).join(", ")}` +
    ` (ignored)${fill}`);
}

function wire(pc, channel) {
  pc.addEventListener("track", (event) => {
    // video, and an avatar's audio: one stream on the <video>, a new track replacing an old one of its kind
    const kept = ui.video.srcObject?.getTracks().filter((t) => t.kind !== event.track.kind) ?? [];
    ui.video.srcObject = new MediaStream([...kept, event.track]);
    playVideo();
  });
  pc.addEventListener("connectionstatechange", () => {
    if (state.pc !== pc) return;
    const s = pc.connectionState;
    clearTimeout(state.disconnectedTimer);
    if (s === "connected") {
      state.reconnect.attempt = 0;
      state.reconnect.since = 0;
    } else if (s === "disconnected") {
      state.disconnectedTimer = setTimeout(() => state.pc === pc && dropped("connection interrupted"), DISCONNECTED_GRACE_MS);
    } else if (s === "failed" || s === "closed") {
      dropped(`connection ${s}`);
    }
  });
  channel.addEventListener("open", () => {
    if (state.pc !== pc) return;
    setPhase("live");
    startStatsPolling(pc);
    flushOutbox();
  });
  channel.addEventListener("close", () => state.pc === pc && dropped("control channel closed"));
  channel.addEventListener("message", (event) => handleMessage(event.data));
}

function teardown() {
  const { pc, channel } = state;
  state.pc = state.channel = null;
  clearTimeout(state.disconnectedTimer);
  clearInterval(state.statsTimer);
  if (!state.userClosed) {
    for (const entry of state.pending.values()) log("warn", `no reply to ${entry.type} (connection closed)`);
  }
  state.pending.clear();
  state.avatar.sending = false;
  state.stats = null; // the next connection's stats replace these; until then show none, not stale ones
  for (const el of Object.values(stat)) el.textContent = "–";
  try { channel?.close(); } catch { /* already closed */ }
  try { pc?.close(); } catch { /* already closed */ }
}

/** The connection went away without the user asking: reconnect to the same session. */
function dropped(reason, retryAfterS = 0) {
  if (state.userClosed) return;
  const wasLive = state.phase === "live";
  teardown();
  if (state.noResume) {
    log("error", `stream ended: ${reason}`);
    forgetSession();
    return stop();
  }
  const r = state.reconnect;
  if (!r.since) r.since = performance.now();
  if (performance.now() - r.since > RECONNECT_GIVE_UP_MS) {
    log("error", `gave up reconnecting after ${Math.round(RECONNECT_GIVE_UP_MS / 1000)} s (${reason})`);
    return stop();
  }
  const delay = Math.max(retryAfterS * 1000, RECONNECT_DELAYS_MS[Math.min(r.attempt, RECONNECT_DELAYS_MS.length - 1)]);
  r.attempt += 1;
  const what = state.sessionId ? `session ${state.sessionId.slice(0, 8)}` : "the server";
  log(wasLive ? "warn" : "info", `${reason}; reconnecting to ${what} in ${(delay / 1000).toFixed(1)} s`);
  setPhase("reconnecting");
  clearTimeout(r.timer);
  r.timer = setTimeout(() => {
    if (!state.userClosed) connect().catch((err) => dropped(err.message));
  }, delay);
}

function fail(err) {
  log("error", err.status ? `server refused (${err.status}): ${err.message}` : err.message);
  if (err.status === 401) {
    ui.settings.open = true;
    log("info", "this server needs an access token: enter it under Connection settings, then Connect");
  }
  teardown();
  stop();
}

function stop() {
  state.userClosed = true;
  releaseAvatarAudio();
  for (const { message } of state.outbox.splice(0)) log("warn", `not connected: ${message.type} not sent`);
  clearTimeout(state.reconnect.timer);
  state.reconnect = { attempt: 0, since: 0, timer: null };
  ui.video.srcObject = null;
  ui.placeholder.hidden = false;
  setPhase("idle");
}

async function disconnect() {
  const sid = state.sessionId;
  state.userClosed = true;
  teardown();
  forgetSession();
  stop();
  if (sid) {
    try {
      await api("DELETE", `/sessions/${encodeURIComponent(sid)}`);
      log("info", `session ${sid.slice(0, 8)} closed`);
    } catch (err) {
      if (err.status !== 404) log("warn", `could not close session ${sid.slice(0, 8)}: ${err.message}`);
    }
  }
}

function rememberSession(id, resumeToken) {
  state.sessionId = id;
  state.resumeToken = resumeToken;
  sessionStorage.setItem(KEY_SESSION, id);
  sessionStorage.setItem(KEY_RESUME, resumeToken);
}

function forgetSession() {
  state.sessionId = state.resumeToken = null;
  sessionStorage.removeItem(KEY_SESSION);
  sessionStorage.removeItem(KEY_RESUME);
}

// --- control channel ----------------------------------------------------------------------------
function send(message, text = "") {
  if (state.channel?.readyState !== "open") {
    if (state.phase === "idle") {
      log("warn", `not connected: ${message.type} not sent`);
      return null;
    }
    state.outbox.push({ message, text }); // connecting: it goes out as soon as the channel opens
    return null;
  }
  const id = state.nextId++;
  state.pending.set(id, { type: message.type, text, sent: performance.now() });
  state.channel.send(JSON.stringify({ ...message, id }));
  return id;
}

function flushOutbox() {
  const queued = state.outbox.splice(0);
  for (const { message, text } of queued) send(message, text);
}

function handleMessage(raw) {
  let message;
  try {
    message = JSON.parse(raw);
  } catch {
    return log("warn", "unreadable message from the server");
  }
  if (message.type === "stats") return showStats(message);
  if (message.type === "stall") return showStall(message);
  const entry = state.pending.get(message.id);
  state.pending.delete(message.id);
  const ms = entry ? ` (${Math.round(performance.now() - entry.sent)} ms)` : "";
  const what = entry?.text ? `${message.of ?? entry.type} ${quote(entry.text)}` : message.of ?? entry?.type ?? "message";
  if (message.type === "ack") {
    state.acks.push({ ...message, ms: entry ? performance.now() - entry.sent : null, text: entry?.text ?? null });
    const at = message.of === "pause" ? "held at frame" : "applied at frame";
    if (message.of === "prompt" && entry?.text && message.detail?.understood) {
      logUnderstood("prompt", entry.text, message.detail, ` ${at} ${message.frame}${ms}`);
    } else {
      log("ack", `✓ ${what} ${at} ${message.frame}${ms}`);
    }
    if (message.of === "pause") syncPauseButtons(true);
    if (message.of === "resume") syncPauseButtons(false);
  } else if (message.type === "error") {
    state.errors.push(message);
    log("error", `✗ ${entry || message.of ? what + ": " : ""}${message.message}`);
    if (!entry && /^generation failed/.test(message.message)) state.noResume = true;
  }
}

function transition() {
  const kind = document.querySelector('input[name="transition"]:checked').value;
  if (kind !== "blend") return { kind: "recache" };
  const chunks = Math.min(32, Math.max(1, Math.round(Number(ui.chunks.value) || 1)));
  ui.chunks.value = chunks;
  return { kind: "blend", chunks, interpolation: ui.interp.value };
}

function sendPrompt() {
  const text = ui.prompt.value.trim();
  if (!text) {
    log("warn", "the prompt is empty");
    return;
  }
  if (state.phase === "idle") return void connect().catch(fail); // Enter while idle starts a stream with it
  send({ type: "prompt", prompt: text, transition: transition() }, text);
}

/** The server froze the stream for a while to recover from a fault: say so over the video, briefly. */
function showStall(message) {
  state.stalls.push(message);
  const what = message.replaced?.length ? `${message.replaced.join(", ")} replaced` : message.reason;
  ui.stall.textContent = `stalled ${message.recovery_s.toFixed(1)} s: ${what}`;
  ui.stall.hidden = false;
  clearTimeout(state.stallTimer);
  state.stallTimer = setTimeout(() => { ui.stall.hidden = true; }, STALL_SHOWN_MS);
  log("warn", `stream stalled ${message.recovery_s.toFixed(1)} s before frame ${message.frame}: ${message.reason}`);
}

// --- stats --------------------------------------------------------------------------------------
function showStats(message) {
  state.stats = message;
  stat.frame.textContent = String(message.frame);
  stat.fps.textContent = message.fps.toFixed(1);
  stat.latency.textContent = `${Math.round(message.latency_ms)} ms`;
  stat.queue.textContent = String(message.queue_depth);
  if (message.avatar) showAvatarStats(message.avatar);
  syncPauseButtons(Boolean(message.paused));
}

function startStatsPolling(pc) {
  clearInterval(state.statsTimer);
  state.decoded = { frames: 0, at: performance.now(), fps: 0, width: 0, height: 0, codec: "" };
  state.statsTimer = setInterval(async () => {
    if (state.pc !== pc) return;
    let report;
    try {
      report = await pc.getStats();
    } catch {
      return;
    }
    for (const s of report.values()) {
      if (s.type !== "inbound-rtp" || s.kind !== "video") continue;
      const now = performance.now();
      const d = state.decoded;
      const frames = s.framesDecoded ?? 0;
      d.fps = frames >= d.frames ? (1000 * (frames - d.frames)) / Math.max(1, now - d.at) : 0;
      Object.assign(d, { frames, at: now, width: s.frameWidth ?? 0, height: s.frameHeight ?? 0 });
      d.codec = report.get(s.codecId)?.mimeType?.replace("video/", "") ?? "";
      stat.decoded.textContent = `${d.fps.toFixed(1)} fps`;
      stat.video.textContent = d.width ? `${d.width}×${d.height} ${d.codec}` : "–";
    }
  }, 1000);
}

function countPresentedFrames() {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const onFrame = () => {
    state.presented += 1;
    ui.placeholder.hidden = true;
    ui.video.requestVideoFrameCallback(onFrame);
  };
  ui.video.requestVideoFrameCallback(onFrame);
}

// --- avatar: face, microphone, speech file ---------------------------------------------------------
/** The server's model is audio-driven: show the face and audio controls instead of the prompt. */
function enterAvatarMode(info) {
  state.avatar.info = info;
  document.body.dataset.mode = "avatar";
  ui.avatar.hidden = false;
  ui.video.muted = !ui.sound.checked;
  chooseFace();
}

/** `shape:#rrggbb` → a 128-px PNG data URL of that face outline filled with the colour, on black (the
 *  avatar world's outlines: a disc, a square, an upright oval). */
function drawFace(preset) {
  const [shape, colour] = preset.split(":");
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 128;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, 128, 128);
  ctx.fillStyle = colour;
  ctx.beginPath();
  if (shape === "square") ctx.rect(20, 20, 88, 88);
  else ctx.ellipse(64, 64, shape === "oval" ? 34 : 50, shape === "oval" ? 54 : 50, 0, 0, 2 * Math.PI);
  ctx.fill();
  return canvas.toDataURL("image/png");
}

/** The face the select names: the server's default (none sent), a preset, or the uploaded picture. */
function chooseFace() {
  const value = ui.face.value;
  const a = state.avatar;
  a.reference = value === "" ? null : value === "upload" ? a.uploaded : drawFace(value);
  ui.referencePreview.src = a.reference ?? drawFace("round:#ffffff");
  if (state.phase !== "idle") log("info", "the new face applies to the next session (Disconnect, then Connect)");
}

/** An uploaded picture → a PNG data URL at most REFERENCE_SIDE px on its longer side (size-limited here,
 *  before the server's own limit); a clear error for a file that is too large or not a picture. */
async function pictureDataUrl(file) {
  if (file.type && !["image/png", "image/jpeg"].includes(file.type)) throw new Error(`${file.name} is not a PNG or JPEG picture`);
  if (file.size > MAX_REFERENCE_FILE_BYTES) {
    throw new Error(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB, over the ${MAX_REFERENCE_FILE_BYTES / 2 ** 20} MB limit`);
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    throw new Error(`${file.name} could not be decoded as a picture`);
  }
  const scale = Math.min(1, REFERENCE_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return canvas.toDataURL("image/png");
}

async function uploadFace() {
  const file = ui.referenceFile.files[0];
  if (!file) return;
  try {
    state.avatar.uploaded = await pictureDataUrl(file);
  } catch (err) {
    ui.referenceFile.value = "";
    return log("error", `face picture refused: ${err.message}`);
  }
  const upload = ui.face.querySelector('option[value="upload"]');
  upload.disabled = false;
  upload.textContent = `uploaded: ${file.name}`;
  ui.face.value = "upload";
  chooseFace();
  log("info", `face picture ${file.name} ready`);
}

/** The offer's audio section: sendrecv with the microphone when it is on, else recvonly; either way the
 *  server's audio (what drove the frames) comes back on it. */
async function addAvatarAudio(pc) {
  const track = ui.microphone.checked ? await openMicrophone() : null;
  state.avatar.sending = Boolean(track);
  if (track) {
    pc.addTransceiver(track, { direction: "sendrecv" });
    log("info", "microphone on: your voice drives the face");
  } else {
    pc.addTransceiver("audio", { direction: "recvonly" });
  }
}

/** The live microphone track (opened once, reused across reconnects), or null with the reason logged. */
async function openMicrophone() {
  const a = state.avatar;
  if (a.microphone?.readyState === "live") return a.microphone;
  if (!navigator.mediaDevices?.getUserMedia) {
    log("error", "no microphone here: browsers allow one only on https:// or localhost pages");
  } else {
    try {
      a.microphone = (await navigator.mediaDevices.getUserMedia({ audio: true })).getAudioTracks()[0];
      return a.microphone;
    } catch (err) {
      log("error", `microphone unavailable (${err.name}: ${err.message})`);
    }
  }
  ui.microphone.checked = false;
  return null;
}

/** The microphone checkbox while connected re-offers the same session with or without it: the server holds
 *  a connection's microphone as the session's audio source until that connection ends, so only a new one
 *  frees the session for a speech file. */
function toggleMicrophone() {
  if (state.phase !== "live" || !state.avatar.info) return;
  if (!ui.microphone.checked) releaseMicrophone();
  log("info", `microphone ${ui.microphone.checked ? "on" : "off"}: reconnecting session ${state.sessionId.slice(0, 8)}`);
  teardown();
  setPhase("reconnecting");
  connect().catch((err) => dropped(err.message));
}

function releaseMicrophone() {
  state.avatar.microphone?.stop();
  state.avatar.microphone = null;
}

/** The session ended: microphone, speech file and audio socket go with it. */
function releaseAvatarAudio() {
  releaseMicrophone();
  stopSpeech();
  state.avatar.socket?.close();
  state.avatar.socket = null;
  syncSpeechButtons();
}

/** Sound on or off: the avatar's audio plays from the <video> (autoplay may need a click first). */
function playVideo() {
  ui.video.muted = !(state.avatar.info && ui.sound.checked);
  ui.video.play().catch((err) => {
    if (err.name !== "NotAllowedError" || ui.video.muted) return; // an interrupted play(): the next one runs
    ui.video.muted = true;
    ui.sound.checked = false;
    ui.video.play().catch(() => {});
    log("warn", "the browser blocked the avatar's sound: tick Sound to hear it");
  });
}

/** A speech file → mono Int16 samples at `rate` (decoded and resampled by the browser). */
async function speechSamples(file, rate) {
  if (file.size > MAX_SPEECH_FILE_BYTES) throw new Error(`it is over the ${MAX_SPEECH_FILE_BYTES / 2 ** 20} MB limit`);
  let audio;
  try {
    audio = await new OfflineAudioContext(1, 1, rate).decodeAudioData(await file.arrayBuffer());
  } catch {
    throw new Error("it could not be decoded as audio");
  }
  const mono = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    audio.getChannelData(c).forEach((v, i) => { mono[i] += v / audio.numberOfChannels; });
  }
  return Int16Array.from(mono, (v) => Math.max(-32768, Math.min(32767, Math.round(v * 32767))));
}

/** The session's audio WebSocket, opened once per session; resolves null (logged) when it cannot open. */
function speechSocket() {
  const a = state.avatar;
  if (a.socket?.readyState === WebSocket.OPEN) return Promise.resolve(a.socket);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const token = ui.token.value.trim();  // a browser's WebSocket cannot send headers: the token rides as a subprotocol
  const socket = new WebSocket(`${scheme}://${location.host}/sessions/${encodeURIComponent(state.sessionId)}/audio` +
                               `?sample_rate=${a.info.sample_rate}`, token ? ["streamgen.audio", `bearer.${token}`] : []);
  socket.binaryType = "arraybuffer";
  a.socket = socket;
  return new Promise((resolve) => {
    socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      let message;
      try { message = JSON.parse(event.data); } catch { return log("warn", "unreadable message on the audio socket"); }
      if (message.type === "ready") resolve(socket);
      handleSpeechMessage(message);
    });
    socket.addEventListener("close", (event) => {
      resolve(null);
      if (a.socket !== socket) return;
      a.socket = null;
      stopSpeech();
      syncSpeechButtons();
      if (event.code === 1006 && !event.wasClean) {
        log("error", "the server refused the audio socket (a wrong access token, or another audio source)");
      } else if (event.code !== 1000) {
        log("info", `audio socket closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`);
      }
    });
  });
}

function handleSpeechMessage(message) {
  if (message.type === "playback_finished") {
    state.avatar.playback.push(message);
    if (message.interrupted) log("warn", `⏹ speech interrupted after ${message.position.toFixed(2)} s shown`);
    else log("ack", `✓ speech finished: ${message.position.toFixed(2)} s shown`);
  } else if (message.type === "error") {
    log("error", `✗ audio${message.of ? ` ${message.of}` : ""}: ${message.message}`);
  }
}

/** Speak: push the chosen file's audio over the socket at most SPEECH_LEAD_S ahead of real time, then flush. */
async function speak() {
  const file = ui.speechFile.files[0];
  if (!file) return log("warn", "choose a speech file first");
  if (state.avatar.sending) return log("warn", "turn the microphone off first: the avatar takes one audio source at a time");
  let samples;
  try {
    samples = await speechSamples(file, state.avatar.info.sample_rate);
  } catch (err) {
    return log("error", `speech file ${file.name} refused: ${err.message}`);
  }
  const socket = await speechSocket();
  if (!socket) return;
  stopSpeech();
  state.avatar.speech = { name: file.name, samples, sent: 0, started: performance.now(), timer: null };
  log("info", `speaking ${file.name} (${(samples.length / state.avatar.info.sample_rate).toFixed(1)} s)`);
  syncSpeechButtons();
  pushSpeech(socket);
}

function pushSpeech(socket) {
  const speech = state.avatar.speech;
  if (!speech || socket.readyState !== WebSocket.OPEN) return;
  const rate = state.avatar.info.sample_rate;
  const due = Math.min(speech.samples.length, ((performance.now() - speech.started) / 1000 + SPEECH_LEAD_S) * rate);
  while (speech.sent < due) {
    const part = speech.samples.subarray(speech.sent, Math.min(speech.sent + SPEECH_MESSAGE_S * rate, speech.samples.length));
    socket.send(part.slice().buffer); // Int16Array: little-endian on every browser platform (s16le)
    speech.sent += part.length;
  }
  if (speech.sent < speech.samples.length) {
    speech.timer = setTimeout(() => pushSpeech(socket), 100);
    return;
  }
  socket.send(JSON.stringify({ type: "flush" }));
  state.avatar.speech = null;
  syncSpeechButtons();
}

function stopSpeech() {
  clearTimeout(state.avatar.speech?.timer);
  state.avatar.speech = null;
}

/** Interrupt (barge-in): stop pushing and have the server drop what has not been shown. */
function interrupt() {
  const socket = state.avatar.socket;
  if (socket?.readyState !== WebSocket.OPEN) return log("warn", "nothing to interrupt: no speech was sent");
  stopSpeech();
  socket.send(JSON.stringify({ type: "clear" }));
  log("info", "interrupt sent");
  syncSpeechButtons();
}

function syncSpeechButtons() {
  const live = state.phase === "live" && Boolean(state.avatar.info);
  ui.speak.disabled = !live || !ui.speechFile.files.length;
  ui.interrupt.disabled = !live || !state.avatar.socket;
}

function showAvatarStats(avatar) {
  stat.av.textContent = avatar.av_latency_ms == null ? "–" : `${Math.round(avatar.av_latency_ms)} ms`;
  stat.buffered.textContent = `${avatar.buffered_s.toFixed(1)} s`;
}

// --- wiring -------------------------------------------------------------------------------------
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  sendPrompt();
});
ui.connect.addEventListener("click", () => connect().catch(fail));
ui.disconnect.addEventListener("click", () => disconnect());
ui.pause.addEventListener("click", () => send({ type: "pause" }));
ui.resume.addEventListener("click", () => send({ type: "resume" }));
ui.reset.addEventListener("click", () => send({ type: "reset" }));
ui.clearLog.addEventListener("click", () => ui.log.replaceChildren());
for (const radio of document.querySelectorAll('input[name="transition"]')) {
  radio.addEventListener("change", () => {
    const blend = document.querySelector('input[name="transition"]:checked').value === "blend";
    ui.chunks.disabled = ui.interp.disabled = !blend;
  });
}
ui.token.value = sessionStorage.getItem(KEY_TOKEN) ?? "";
ui.token.addEventListener("change", () => {
  const token = ui.token.value.trim();
  if (token) sessionStorage.setItem(KEY_TOKEN, token); // tab-scoped: gone when the tab closes
  else sessionStorage.removeItem(KEY_TOKEN);
});
ui.video.addEventListener("playing", () => { ui.placeholder.hidden = true; });
ui.face.addEventListener("change", chooseFace);
ui.referenceFile.addEventListener("change", uploadFace);
ui.microphone.addEventListener("change", toggleMicrophone);
ui.sound.addEventListener("change", playVideo);
ui.speechFile.addEventListener("change", syncSpeechButtons);
ui.speak.addEventListener("click", speak);
ui.interrupt.addEventListener("click", interrupt);
countPresentedFrames();
setPhase("idle");
loadModel();

/** GET /model once (again at Connect while it failed: a token may be needed first) and show what it says. */
async function loadModel() {
  if (state.model) return state.model;
  try {
    state.model = await api("GET", "/model");
  } catch {
    return null; // the page works without it, as for a text model
  }
  if (state.model.avatar) enterAvatarMode(state.model.avatar);
  showVocabulary(state.model);
  return state.model;
}

/** For a closed-vocabulary model, name the words it knows under the prompt box (others are ignored). */
function showVocabulary(model) {
  const words = model.vocabulary;
  if (!words || !Object.keys(words).length) return;
  const example = [words.colour?.[0], words.shape?.[1], words.direction?.[0]].filter(Boolean);
  if (example.length === 3) ui.prompt.placeholder = `e.g. a ${example[0]} ${example[1]} moving ${example[2]}, press Enter`;
  ui.vocabulary.textContent = `${model.name} knows only these words — ` +
    Object.entries(words).map(([kind, list]) => `${kind}: ${list.join(", ")}`).join("; ") + ". Other words are ignored.";
  ui.vocabulary.hidden = false;
}

// A reload within the server's grace period picks the same stream back up.
if (state.sessionId) {
  log("info", `resuming session ${state.sessionId.slice(0, 8)} from before the reload`);
  connect({ fallbackToNew: false }).catch(fail);
}

// For tests and the console: read-only views plus the actions the buttons take.
window.streamgen = {
  get phase() { return state.phase; },
  get sessionId() { return state.sessionId; },
  get stats() { return state.stats; },
  get decoded() { return { ...state.decoded }; },
  get presented() { return state.presented; },
  get acks() { return state.acks.slice(); },
  get errors() { return state.errors.slice(); },
  get stalls() { return state.stalls.slice(); },
  get avatar() {
    const a = state.avatar;
    return { mode: Boolean(a.info), reference: a.reference, microphone: a.microphone?.readyState === "live",
             sending: a.sending, speaking: Boolean(a.speech), playback: a.playback.slice() };
  },
  connect: () => connect(),
  disconnect,
  send,
  /** Close the peer connection without telling the server, as a network drop would. */
  simulateDrop() {
    const pc = state.pc;
    if (!pc) return;
    pc.close();
    if (state.pc === pc) dropped("connection dropped (simulated)");
  },
};
