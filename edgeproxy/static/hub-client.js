// edgeproxy hub client for browsers (ES module, no dependencies).
//
// Served by edgeproxy at /.edgeproxy/hub-client.js and shipped in the package
// as edgeproxy/static/hub-client.js. The hub's protocol: edgeproxy/hub/protocol.py
// (README "Channels"). The Python twin is edgeproxy/client.py; both follow the
// same rules:
//
//   import { HubClient } from "/.edgeproxy/hub-client.js";
//   const hub = new HubClient("/hub", { token: () => fetch("/token").then((r) => r.text()) });
//   hub.addEventListener("publication", (e) => show(e.detail)); // {channel, seq, epoch, data}, once, in order
//   hub.addEventListener("unrecovered", (e) => reload(e.detail.channel)); // history no longer covers the gap
//   hub.subscribe("news");
//
// * Transport: a WebSocket to the hub's path; EventSource on `<path>/sse` when the
//   WebSocket cannot work (see "fallback" below), or always with transport: "sse".
// * Reconnects with exponential backoff and full jitter: the n-th wait in a row
//   (n = 0, 1, ...) is uniform in [min, min(max, first * 2**n)] ms, 500-1000,
//   500-2000, ... 500-30000 by default. A connection that got as far as the hub's
//   `connected` resets n.
// * Resumes: every reconnect subscribes each channel again from the position
//   (seq and epoch) of the last publication handed out, so the hub replays what was
//   missed. Over EventSource the positions go in the last_event_id parameter (the
//   client re-creates the EventSource itself, so it cannot set Last-Event-ID).
// * Drops duplicates by seq: a publication at or below the channel's position in
//   the same epoch is never handed out twice (`duplicates` counts them).
// * Detects a dead WebSocket: nothing heard for pingTimeout (default: twice the
//   hub's ping_interval plus one second) closes it and reconnects.
// * Close codes: 4000 (the hub dropped a slow subscriber) is an ordinary reconnect;
//   4001 (bad token) and 4002 (expired) reconnect with a new token when `token` is
//   a function, and otherwise end the client ("closed" event). An EventSource
//   refused with 401 counts as 4001 (4002 for an expired token).
//
// Fallback (transport: "auto", the default): a WebSocket attempt that ends before
// the hub's `connected` (blocked by a proxy, a CSP, no WebSocket at all) is followed
// at once by an EventSource attempt; when that one fails too, the usual wait and a
// WebSocket again (the hub may simply be down). Once EventSource worked where the
// WebSocket did not, reconnects use EventSource for retryWebSocketAfter ms
// (default 60000) before a WebSocket is tried again.

export const CLOSE_RESUME = 4000;
export const CLOSE_BAD_TOKEN = 4001;
export const CLOSE_TOKEN_EXPIRED = 4002;
const TRANSPORTS = ["auto", "websocket", "sse"];
const SSE_EVENTS = ["connected", "subscribed", "pub", "message"];

/** Exponential backoff with full jitter: attempt n waits uniformly in [min, min(max, first * 2**n)] ms. */
export class Backoff {
  constructor({ min = 500, first = 1000, max = 30000, random = Math.random } = {}) {
    if (!(first > 0 && max >= first && min >= 0 && min <= first)) {
      throw new RangeError("Backoff needs 0 < first <= max and 0 <= min <= first");
    }
    this.min = min; this.first = first; this.max = max; this.random = random;
  }
  /** The upper bound of attempt `attempt` (0-based), in ms. */
  ceiling(attempt) { return Math.min(this.max, this.first * 2 ** Math.min(attempt, 30)); }
  /** The wait before attempt `attempt` for a uniform `draw` in [0, 1), in ms. */
  delay(attempt, draw = this.random()) { return this.min + (this.ceiling(attempt) - this.min) * draw; }
}

/** The hub's WebSocket and event-stream URLs from its path or URL (ws:, wss:, http: or https:). */
export function hubUrls(url) {
  const base = new URL(url, globalThis.location ? globalThis.location.href : undefined);
  const secure = base.protocol === "https:" || base.protocol === "wss:";
  const ws = new URL(base.href); ws.protocol = secure ? "wss:" : "ws:";
  const sse = new URL(base.href); sse.protocol = secure ? "https:" : "http:";
  sse.pathname = base.pathname.replace(/\/$/, "") + "/sse";
  return { ws: ws.href, sse: sse.href };
}

function withParams(url, params) {
  const out = new URL(url);
  for (const [name, value] of params) out.searchParams.append(name, value);
  return out.href;
}

/** What an EventSource refusal said: its status and the hub's code and message. */
async function probeRefusal(url, timeout) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeout);
  try {
    const response = await fetch(url, { headers: { Accept: "text/event-stream" }, cache: "no-store", signal: abort.signal });
    if (response.ok) return { status: response.status };  // it works now: the next attempt will tell
    const text = await response.text();
    let code = null, message = text.trim();
    try { ({ error: code, message } = JSON.parse(text)); } catch {
      const match = /^([a-z_]+): (.*)$/s.exec(message);
      if (match) [, code, message] = match;
    }
    return { status: response.status, code, message };
  } catch {
    return { status: 0 };  // unreachable (or cross-origin without CORS): nothing more to learn
  } finally {
    clearTimeout(timer);
    abort.abort();
  }
}

export class HubClient extends EventTarget {
  /**
   * @param {string} url the hub: "/hub", "wss://example.com/hub" or "https://example.com/hub".
   * @param {object} [options]
   * @param {string|function(): (string|Promise<string>)} [options.token] a JWT, or a function called at every connect.
   * @param {"auto"|"websocket"|"sse"} [options.transport] default "auto" (WebSocket, EventSource as fallback).
   * @param {Backoff|{min?: number, first?: number, max?: number, random?: function(): number}} [options.backoff]
   * @param {number} [options.openTimeout] ms an attempt may take to get the hub's `connected` (default 10000).
   * @param {number} [options.pingTimeout] ms of silence that make a WebSocket dead (default 2 * ping_interval + 1 s).
   * @param {number} [options.retryWebSocketAfter] ms on EventSource before a WebSocket is tried again (default 60000).
   * @param {string[]} [options.channels] channels to subscribe at once.
   */
  constructor(url, options = {}) {
    super();
    this.urls = hubUrls(url);
    this.token = options.token ?? null;
    this.transportOption = options.transport ?? "auto";
    if (!TRANSPORTS.includes(this.transportOption)) {
      throw new RangeError(`transport must be one of ${TRANSPORTS.join(", ")}, not ${this.transportOption}`);
    }
    this.backoff = options.backoff instanceof Backoff ? options.backoff : new Backoff(options.backoff ?? {});
    this.openTimeout = options.openTimeout ?? 10000;
    this.pingTimeout = options.pingTimeout ?? null;
    this.retryWebSocketAfter = options.retryWebSocketAfter ?? 60000;
    /** channel -> {seq, epoch} of the last publication handed out (null: none yet) */
    this.positions = new Map();
    /** "connecting", "open" (the hub said `connected`) or "closed" (for good) */
    this.state = "connecting";
    /** "websocket" or "sse" while open */
    this.transport = null;
    /** the connection's id, as the hub said in `connected` (what POST /v1/send addresses); new at every connect */
    this.clientId = null;
    this.connects = 0;      // connections that reached `connected`
    this.duplicates = 0;    // publications dropped by seq
    this.onpublication = this.onmessage = this.onsubscribed = this.onunrecovered = null;
    this.onconnected = this.ondisconnected = this.onreconnecting = this.onerror = this.onclosed = null;
    this._conn = null;        // the current attempt or connection
    this._attempt = 0;        // failed attempts in a row (the backoff's n)
    this._timer = null;       // the reconnect wait
    this._fallbackNow = false;  // the WebSocket just failed: EventSource next, at once
    this._sseWorkedAt = 0;    // when EventSource worked where the WebSocket had failed
    this._reopening = false;
    for (const channel of options.channels ?? []) this.subscribe(channel);
    Promise.resolve().then(() => this._connect());
  }

  /** Subscribe now and after every reconnect; `since` ({seq, epoch}) resumes after that publication. */
  subscribe(channel, { since = null } = {}) {
    if (typeof channel !== "string" || !channel) throw new TypeError("a channel is a non-empty string");
    const known = this.positions.has(channel);
    if (known && !since) return this;
    this.positions.set(channel, since ? { seq: since.seq, epoch: since.epoch } : null);
    if (this._conn?.kind === "sse") this._reopenSoon();
    else {
      if (known) this._send({ op: "unsubscribe", channel });  // re-positioned: subscribe again from `since`
      this._sendSubscribe(channel);
    }
    return this;
  }

  unsubscribe(channel) {
    if (!this.positions.delete(channel)) return this;
    if (this._conn?.kind === "sse") this._reopenSoon();
    else this._send({ op: "unsubscribe", channel });
    return this;
  }

  /** The position of the last publication handed out on `channel` ({seq, epoch}), or null. */
  position(channel) {
    const position = this.positions.get(channel);
    return position ? { ...position } : null;
  }

  /** Stop for good: no reconnect, a "closed" event. */
  close() {
    if (this.state === "closed") return;
    clearTimeout(this._timer);
    if (this._conn) this._drop(this._conn);
    this._finish({ code: 1000, reason: "closed by the application" });
  }

  // -- events ----------------------------------------------------------------------

  _emit(type, detail) {
    const event = new CustomEvent(type, { detail });
    const handler = this["on" + type];
    if (typeof handler === "function") {
      try {  // as dispatchEvent does for listeners: an application's exception must not stop the client
        handler.call(this, event);
      } catch (exc) {
        if (typeof reportError === "function") reportError(exc); else setTimeout(() => { throw exc; });
      }
    }
    this.dispatchEvent(event);
  }

  _finish(detail) {
    this.state = "closed";
    this.transport = null;
    this._emit("closed", detail);
  }

  // -- connecting ------------------------------------------------------------------

  _nextKind() {
    if (this.transportOption !== "auto") return this.transportOption;
    if (typeof WebSocket === "undefined") return "sse";
    if (typeof EventSource === "undefined") return "websocket";
    if (this._fallbackNow) return "sse";
    if (this._sseWorkedAt && Date.now() - this._sseWorkedAt < this.retryWebSocketAfter) return "sse";
    return "websocket";
  }

  async _connect(kind = this._nextKind(), afterWebSocketFailed = this._fallbackNow) {
    if (this.state === "closed") return;
    this._fallbackNow = false;
    const conn = { kind, healthy: false, done: false, socket: null, openTimer: null, pingTimer: null, silence: 0,
                   afterWebSocketFailed };
    this._conn = conn;
    let token = this.token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (exc) {
        this._emit("error", { code: "token_source", message: String(exc), transport: kind });
        this._lost(conn, { code: 1006, reason: "the token function failed" });
        return;
      }
    }
    if (conn.done) return;
    conn.openTimer = setTimeout(() => this._lost(conn, { code: 1006, reason: "open timeout" }), this.openTimeout);
    if (kind === "websocket") this._openWebSocket(conn, token);
    else this._openEventSource(conn, token);
  }

  _openWebSocket(conn, token) {
    let ws;
    try {
      ws = new WebSocket(withParams(this.urls.ws, token ? [["token", token]] : []));
    } catch (exc) {  // no WebSocket here (a CSP, a sandbox): as a failed connect
      this._lost(conn, { code: 1006, reason: `WebSocket refused: ${exc.message}` });
      return;
    }
    conn.socket = ws;
    ws.onmessage = (event) => this._receive(conn, event.data);
    ws.onclose = (event) => this._lost(conn, { code: event.code, reason: event.reason });
    ws.onerror = () => {};  // a close follows
  }

  _openEventSource(conn, token) {
    const channels = [...this.positions.keys()];
    if (!channels.length) {  // a stream needs a channel: wait for a subscribe
      clearTimeout(conn.openTimer);
      return;
    }
    const params = channels.map((channel) => ["channel", channel]);
    if (token) params.push(["token", token]);
    const ids = channels.map((channel) => {
      const position = this.positions.get(channel);
      return position ? `${position.epoch}:${position.seq}` : "";
    });
    if (ids.some(Boolean)) params.push(["last_event_id", ids.join(",")]);
    const url = withParams(this.urls.sse, params);
    let es;
    try {
      es = new EventSource(url);
    } catch (exc) {
      this._lost(conn, { code: 1006, reason: `EventSource refused: ${exc.message}` });
      return;
    }
    conn.socket = es;
    for (const type of SSE_EVENTS) es.addEventListener(type, (event) => this._receive(conn, event.data));
    es.onerror = () => {
      if (conn.done) return;
      es.close();  // the client, not the browser, decides when to come back (backoff, positions)
      if (conn.healthy) this._lost(conn, { code: 1006, reason: "the event stream ended" });
      else this._refused(conn, url);
    };
  }

  /** An EventSource that never opened: ask the hub why (a status), then handle it as a close code. */
  async _refused(conn, url) {
    const { status, code, message } = await probeRefusal(url, this.openTimeout);
    if (conn.done) return;
    if (status >= 400) this._emit("error", { code: code ?? `http_${status}`, message, status, transport: "sse" });
    let close = 1006;
    if (status === 401) close = code === "token_expired" ? CLOSE_TOKEN_EXPIRED : CLOSE_BAD_TOKEN;
    this._lost(conn, { code: close, reason: status ? `HTTP ${status}` : "the event stream failed", status });
  }

  /** Re-open the event stream (its channels changed) once this task is done, resuming every channel. */
  _reopenSoon() {
    if (this._reopening) return;
    this._reopening = true;
    queueMicrotask(() => {
      this._reopening = false;
      const conn = this._conn;
      if (!conn || conn.kind !== "sse" || this.state === "closed") return;
      this._drop(conn);
      this._connect("sse", conn.afterWebSocketFailed && !conn.healthy);
    });
  }

  _drop(conn) {
    conn.done = true;
    clearTimeout(conn.openTimer);
    clearTimeout(conn.pingTimer);
    const socket = conn.socket;
    if (socket) {
      socket.onmessage = socket.onclose = socket.onerror = null;
      try { socket.close(); } catch { /* already closed */ }
    }
    if (this._conn === conn) this._conn = null;
  }

  /** The attempt or connection `conn` ended: wait (backoff) and try again, or stop for good. */
  _lost(conn, { code, reason, status = null }) {
    if (conn.done) return;
    const wasOpen = conn.healthy;
    this._drop(conn);
    if (this.state === "closed") return;
    this.state = "connecting";
    this.transport = null;
    if (wasOpen) this._emit("disconnected", { transport: conn.kind, code, reason });
    if ((code === CLOSE_BAD_TOKEN || code === CLOSE_TOKEN_EXPIRED) && typeof this.token !== "function") {
      this._finish({ code, reason: `the hub refused the token (close code ${code})` });
      return;
    }
    let delay;
    if (!wasOpen && conn.kind === "websocket" && this.transportOption === "auto" && typeof EventSource !== "undefined") {
      this._fallbackNow = true;  // try the other transport at once; the wait comes if it fails too
      delay = 0;
    } else {
      delay = this.backoff.delay(this._attempt);
      this._attempt += 1;
    }
    this._emit("reconnecting", { transport: conn.kind, code, reason, status, delay, attempt: this._attempt,
                                 next: this._nextKind() });
    this._timer = setTimeout(() => this._connect(), delay);
  }

  // -- messages --------------------------------------------------------------------

  _send(message) {
    const conn = this._conn;
    if (conn && conn.kind === "websocket" && conn.healthy && conn.socket.readyState === WebSocket.OPEN) {
      conn.socket.send(JSON.stringify(message));
    }
  }

  _sendSubscribe(channel) {
    const message = { op: "subscribe", channel };
    const position = this.positions.get(channel);
    if (position) message.since = { seq: position.seq, epoch: position.epoch };
    this._send(message);
  }

  _heard(conn) {
    if (!conn.silence) return;
    clearTimeout(conn.pingTimer);
    conn.pingTimer = setTimeout(
      () => this._lost(conn, { code: 1006, reason: `nothing heard for ${conn.silence} ms` }), conn.silence);
  }

  _receive(conn, raw) {
    if (conn.done) return;
    let message;
    try { message = JSON.parse(raw); } catch { return; }
    this._heard(conn);
    switch (message.op) {
      case "pub": this._onPub(message); break;
      case "ping": this._send({ op: "pong" }); break;
      case "connected": this._onConnected(conn, message); break;
      case "subscribed": this._onSubscribed(message); break;
      case "message": this._emit("message", { data: message.data }); break;
      case "error": this._emit("error", { ...message, transport: conn.kind }); break;
      default: break;  // unsubscribed, and whatever a newer hub adds
    }
  }

  _onConnected(conn, message) {
    clearTimeout(conn.openTimer);
    conn.healthy = true;
    this._attempt = 0;
    this.connects += 1;
    this.state = "open";
    this.transport = conn.kind;
    this.clientId = message.client ?? null;
    if (conn.afterWebSocketFailed) this._sseWorkedAt = Date.now();  // EventSource works where WebSocket did not
    else if (conn.kind === "websocket") this._sseWorkedAt = 0;
    if (conn.kind === "websocket") {
      conn.silence = this.pingTimeout ?? (message.ping_interval ? 2 * message.ping_interval * 1000 + 1000 : 0);
      this._heard(conn);
    }
    this._emit("connected", { transport: conn.kind, clientId: this.clientId });
    if (conn.kind === "websocket") for (const channel of this.positions.keys()) this._sendSubscribe(channel);
  }

  _onSubscribed(message) {
    const { channel, seq, epoch, recovered } = message;
    if (!this.positions.has(channel)) return;
    const before = this.positions.get(channel);
    if (!before || !recovered) this.positions.set(channel, { seq, epoch });
    this._emit("subscribed", { channel, seq, epoch, recovered });
    if (before && !recovered) this._emit("unrecovered", { channel, position: { seq, epoch } });
  }

  _onPub(message) {
    const { channel, seq, epoch, data } = message;
    if (!this.positions.has(channel)) return;  // unsubscribed meanwhile
    const position = this.positions.get(channel);
    if (position && position.epoch === epoch && seq <= position.seq) {
      this.duplicates += 1;
      return;
    }
    this.positions.set(channel, { seq, epoch });
    this._emit("publication", { channel, seq, epoch, data });
  }
}
