// edgeproxy resumable WebSocket client (ES module, no dependencies).
//
// Served by edgeproxy at /.edgeproxy/resume-client.js and shipped in the
// package as edgeproxy/static/resume-client.js. Wire protocol:
// docs/resume-protocol.md ("edgeproxy.resume.v1").
//
//   import { ResumableWebSocket } from "/.edgeproxy/resume-client.js";
//   const ws = new ResumableWebSocket("wss://example.com/chat", "chat");
//   ws.onmessage = (e) => console.log(e.data);      // each message once, in order
//   ws.addEventListener("reset", () => reloadState()); // the session could not be resumed
//   ws.send("hello");                                 // reaches the backend exactly once
//
// Events: open, message, close, error (as WebSocket), plus reconnecting
// (detail.attempt, detail.delay), resumed (detail.replayed), reset
// (detail.reason) and acked (detail.bufferedAmount). Dead connections are found with application-level pings
// inside the envelope (browsers cannot see protocol pings): nothing heard for
// pingTimeout after a ping closes the socket and reconnects with backoff
// (exponential, full jitter) and the resume token.
//
// Messages sent are kept until the proxy acknowledges them (to resend after a
// resume); bufferedAmount is their size in bytes. send() throws a RangeError
// when a message would take it past maxBufferedBytes (default 1 MiB), so a
// client cut off for long cannot grow without bound: wait for bufferedAmount
// to fall (the "acked" event says when) and send again.

export const SUBPROTOCOL = "edgeproxy.resume.v1";
export const CLOSE_NOT_RESUMABLE = 4409;

/** Bytes of `data` on the wire: UTF-8 length of a string, byte length of a buffer or view. */
export function byteLength(data) {
  if (typeof data === "string") {
    let n = 0;
    for (let i = 0; i < data.length; i++) {
      const c = data.charCodeAt(i);
      if (c < 0x80) n += 1;
      else if (c < 0x800) n += 2;
      else if (c >= 0xd800 && c < 0xdc00 && i + 1 < data.length) { n += 4; i += 1; }
      else n += 3;
    }
    return n;
  }
  if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) return data.byteLength;
  throw new TypeError("send() takes a string, an ArrayBuffer or a typed array / DataView");
}

export class Backoff {
  constructor(base = 500, cap = 30000, random = Math.random) {
    this.base = base; this.cap = cap; this.random = random; this.attempt = 0;
  }
  nextDelay() {
    const ceiling = Math.min(this.cap, this.base * 2 ** Math.min(this.attempt, 30));
    this.attempt += 1;
    return this.random() * ceiling; // full jitter: uniform in [0, ceiling]
  }
  reset() { this.attempt = 0; }
}

export class ResumableWebSocket extends EventTarget {
  static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;

  constructor(url, protocol = null, options = {}) {
    super();
    this.url = url;
    this.appProtocol = protocol;
    this.wrapper = protocol ? `${SUBPROTOCOL}+${protocol}` : SUBPROTOCOL;
    this.pingInterval = options.pingInterval ?? 5000;
    this.pingTimeout = options.pingTimeout ?? 10000;
    this.ackEvery = options.ackEvery ?? 16;
    this.ackBytes = options.ackBytes ?? 65536;
    this.connectTimeout = options.connectTimeout ?? 10000;
    this.maxBufferedBytes = options.maxBufferedBytes ?? 1048576;
    this.backoff = options.backoff ?? new Backoff(options.backoffBase ?? 500, options.backoffCap ?? 30000);
    this.binaryType = "blob";
    this.readyState = ResumableWebSocket.CONNECTING;
    this.protocol = "";
    this.resumable = false;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this.onreconnecting = this.onresumed = this.onreset = this.onacked = null;
    this._token = null;
    this._lastSeq = 0;      // last upstream message delivered
    this._ackedIn = 0;      // last one acknowledged to the proxy
    this._unackedInBytes = 0;  // received since that ack
    this._outSeq = 0;       // last client message numbered
    this._unacked = [];     // [seq, data, bytes] not yet acknowledged by the proxy
    this._unackedBytes = 0;
    this._ready = false;
    this._closing = false;
    this._pingId = 0;
    this._timer = null;
    this._lastHeard = 0;
    this._pingSent = 0;
    this.resumes = 0; this.resets = 0;
    this._connect();
  }

  get lastSeq() { return this._lastSeq; }

  /** Bytes sent (or queued) and not yet acknowledged by the proxy. */
  get bufferedAmount() { return this._unackedBytes; }

  send(data) {
    if (this._closing) throw new Error("WebSocket is closed");
    if (!this.resumable && this._ready) { this._ws.send(data); return; }
    const size = byteLength(data);
    if (this._unacked.length && this._unackedBytes + size > this.maxBufferedBytes) {
      throw new RangeError(`resend buffer full: ${this._unackedBytes} bytes await the proxy's acknowledgement ` +
                           `(maxBufferedBytes ${this.maxBufferedBytes})`);
    }
    this._outSeq += 1;
    this._unacked.push([this._outSeq, data, size]);
    this._unackedBytes += size;
    if (this._ready) this._sendData(this._outSeq, data);
  }

  close(code = 1000, reason = "") {
    this._closing = true;
    this.readyState = ResumableWebSocket.CLOSING;
    clearTimeout(this._timer);
    if (this._ws) this._ws.close(code, reason);
    else this._finish(code, reason);
  }

  _emit(type, detail, init) {
    const event = init ?? new CustomEvent(type, { detail });
    const handler = this["on" + type];
    if (typeof handler === "function") handler.call(this, event);
    this.dispatchEvent(event);
  }

  _connect() {
    // The bare protocol too: a proxy without resume forwards both and the backend picks it.
    const offers = this.appProtocol ? [this.wrapper, this.appProtocol] : [this.wrapper];
    if (this._token) offers.push(`${SUBPROTOCOL}.r.${this._token}.${this._lastSeq}`);
    const ws = new WebSocket(this.url, offers);
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._ready = false;
    // A handshake through a dead path may hang for minutes: give up on it.
    const connectTimer = setTimeout(() => {
      if (ws.readyState === WebSocket.CONNECTING && ws === this._ws) {
        ws.onclose = null; ws.close(); this._onClose(ws, 1006, "connect timeout");
      }
    }, this.connectTimeout);
    ws.onopen = () => {
      clearTimeout(connectTimer);
      this.protocol = ws.protocol;
      this.resumable = ws.protocol.startsWith(SUBPROTOCOL);
      this._heard();
      if (!this.resumable) this._becomeReady(false, 0);  // a plain WebSocket
      this._tick();
    };
    ws.onmessage = (e) => { this._heard(); this._onFrame(e.data); };
    ws.onerror = () => {};
    ws.onclose = (e) => this._onClose(ws, e.code, e.reason);
  }

  _heard() { this._lastHeard = Date.now(); this._pingSent = 0; }

  _tick() {
    clearTimeout(this._timer);
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    const now = Date.now();
    if (this._pingSent && now - this._pingSent >= this.pingTimeout) {
      ws.onclose = null;  // dead: do not wait for a close that may never come
      ws.close();
      this._onClose(ws, 1006, "no answer to ping");
      return;
    }
    if (this.resumable && !this._pingSent && now - this._lastHeard >= this.pingInterval) {
      this._pingId += 1;
      ws.send("C" + JSON.stringify({ t: "ping", id: this._pingId }));
      this._pingSent = now;
    }
    if (this.resumable && this._lastSeq !== this._ackedIn) this._sendAck();
    this._timer = setTimeout(() => this._tick(), Math.min(this.pingInterval, this.pingTimeout) / 4);
  }

  _onFrame(data) {
    if (!this.resumable) { this._deliver(data); return; }
    const text = typeof data === "string";
    const bytes = text ? null : new Uint8Array(data);
    const kind = text ? data[0] : String.fromCharCode(bytes[0]);
    if (kind === "C") {
      const fields = JSON.parse(data.slice(1));
      if (fields.t === "session") {
        this._token = fields.token;
        this._onAcked(fields.ack ?? 0);
        const resumed = !!fields.resumed;
        this._becomeReady(resumed, fields.replayed ?? 0);
      } else if (fields.t === "ack") {
        this._onAcked(fields.seq);
      }
      return;
    }
    let seq, body;
    if (text) {
      const colon = data.indexOf(":");
      seq = Number(data.slice(1, colon)); body = data.slice(colon + 1);
    } else {
      const colon = bytes.indexOf(58);
      seq = Number(new TextDecoder().decode(bytes.subarray(1, colon)));
      body = data.slice(colon + 1);
    }
    if (seq <= this._lastSeq) return;                 // a duplicate
    if (seq !== this._lastSeq + 1) { this._ws.close(4000, "gap"); return; }
    this._lastSeq = seq;
    this._unackedInBytes += text ? data.length : bytes.length;
    this._deliver(body);
    // by count, and by bytes: the proxy stops sending once its buffer (1 MiB by default) waits for acks
    if (this._lastSeq - this._ackedIn >= this.ackEvery || this._unackedInBytes >= this.ackBytes) this._sendAck();
  }

  _deliver(data) {
    if (this.binaryType === "blob" && data instanceof ArrayBuffer) data = new Blob([data]);
    this._emit("message", null, new MessageEvent("message", { data }));
  }

  _becomeReady(resumed, replayed) {
    this._ready = true;
    this.backoff.reset();
    const first = this.readyState === ResumableWebSocket.CONNECTING;
    this.readyState = ResumableWebSocket.OPEN;
    for (const [seq, data] of this._unacked) {
      if (this.resumable) this._sendData(seq, data); else this._ws.send(data);
    }
    if (!this.resumable) { this._unacked = []; this._unackedBytes = 0; }
    if (first) this._emit("open", null, new Event("open"));
    if (resumed) { this.resumes += 1; this._emit("resumed", { replayed }); }
  }

  _onAcked(seq) {
    let n = 0;
    while (n < this._unacked.length && this._unacked[n][0] <= seq) this._unackedBytes -= this._unacked[n++][2];
    if (n) { this._unacked.splice(0, n); this._emit("acked", { bufferedAmount: this._unackedBytes }); }
  }

  _sendAck() {
    this._ackedIn = this._lastSeq;
    this._unackedInBytes = 0;
    this._ws.send("C" + JSON.stringify({ t: "ack", seq: this._lastSeq }));
  }

  _sendData(seq, data) {
    if (typeof data === "string") { this._ws.send(`D${seq}:${data}`); return; }
    const head = new TextEncoder().encode(`D${seq}:`);
    const body = data instanceof ArrayBuffer ? new Uint8Array(data)
      : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const out = new Uint8Array(head.length + body.length);
    out.set(head); out.set(body, head.length);
    this._ws.send(out);
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    clearTimeout(this._timer);
    this._ws = null;
    this._ready = false;
    if (this._closing || (!this.resumable && this.readyState === ResumableWebSocket.OPEN)) {
      this._finish(code, reason); return;
    }
    if (code === 1000 && this.resumable) { this._finish(code, reason); return; }
    if (code === CLOSE_NOT_RESUMABLE) {
      // The session is gone: start a new one; the application reloads its state.
      this.resets += 1;
      this._token = null; this._lastSeq = 0; this._ackedIn = 0; this._outSeq = 0;
      this._unacked = []; this._unackedBytes = 0;
      this.backoff.reset();
      this._emit("reset", { reason });
    }
    const delay = this.backoff.nextDelay();
    this._emit("reconnecting", { attempt: this.backoff.attempt, delay });
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _finish(code, reason) {
    this.readyState = ResumableWebSocket.CLOSED;
    this._emit("close", null, new CloseEvent("close", { code, reason, wasClean: code !== 1006 }));
  }
}

export default ResumableWebSocket;
