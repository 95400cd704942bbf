#!/usr/bin/env node
// Load generator for `make bench` (bench/run.py starts one or more of these, pinned to a core).
//
//   node bench/loadgen.js '<json config>'
//
// Protocol with the runner (stdin/stdout, one JSON object per line):
//   -> {"event":"ready", ...}     every socket is open (ws/idle) or the agent is set up (sse)
//   <- "go"                       start the streams (ws/sse), or nothing to do (idle)
//   -> {"event":"active"}         (config.hold) every stream has received its first chunk
//   <- "stop"                     (config.hold / idle) close everything
//   -> {"event":"result", ...}    counters and raw samples (microseconds), then exit
//
// Modes:
//   ws    WebSocket clients of the gateway: `sockets` x `streams` stream slots, each running
//         `rounds` streams one after another (`round_gap_ms` apart, if set); every stream is checked (seq contiguous from 1,
//         done.seq == last seq, done.text == concatenation of the chunks, expected chunk count).
//   sse   the same streams read directly from the upstream (HTTP POST + SSE), no gateway.
//   idle  `sockets` WebSocket clients that only wait for `welcome` (memory per idle socket).
//
// Clocks: chunk stamps ("@<ns>;") are CLOCK_MONOTONIC nanoseconds written by the mock upstream
// (time.monotonic_ns()); process.hrtime.bigint() reads the same clock, so latencies compare the
// upstream's write time with this process's receive time on one machine clock.
'use strict';

const http = require('http');
const readline = require('readline');
const WebSocket = require('ws');

const cfg = JSON.parse(process.argv[2] || '{}');
const now = () => Number(process.hrtime.bigint()); // ns; exact below 2**53 (104 days of uptime)
const STAMP_RE = /@(\d+);/g;

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

const stdinLines = [];
let stdinWaiter = null;
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  line = line.trim();
  if (stdinWaiter && stdinWaiter.word === line) {
    const w = stdinWaiter;
    stdinWaiter = null;
    w.resolve();
  } else {
    stdinLines.push(line);
  }
});
function waitFor(word) {
  const i = stdinLines.indexOf(word);
  if (i >= 0) {
    stdinLines.splice(i, 1);
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    stdinWaiter = { word, resolve };
  });
}

// ------------------------------------------------------------------------------ results

const res = {
  event: 'result',
  mode: cfg.mode,
  streams_ok: 0,
  streams_failed: 0,
  cancelled: 0,
  upstream_chunks: 0, // chunks of completed streams (counted from their text)
  frames: 0, // text_chunk frames (ws) or SSE content events (sse) received
  bytes: 0,
  errors: [], // first few problems, for the runner to print
  elapsed_s: 0,
  latency_us: [], // per upstream chunk: receive time - upstream stamp
  ttfc_us: [], // per stream: first chunk received - start (or POST) sent
  cancel_us: [], // per cancelled stream: `cancelled` received - `cancel` sent
  cancel_sent_ns: {}, // tag -> monotonic ns when `cancel` was sent (runner joins with the mock)
  open_failed: 0,
  open_retried: 0,
  cpu_s: 0,
};

function problem(msg) {
  res.streams_failed += 1;
  if (res.errors.length < 10) res.errors.push(msg);
}

function promptFor(tag) {
  // Replace {tag} in the configured prompt so the mock can report per-stream facts.
  return cfg.prompt.replace('{tag}', tag);
}

function countChunks(text) {
  // Stamped chunks carry one stamp each; plain fast chunks are one word + space each.
  if (cfg.stamps) {
    let n = 0;
    for (const _ of text.matchAll(STAMP_RE)) n += 1;
    return n;
  }
  return text.length === 0 ? 0 : text.split(' ').length;
}

function recordStamps(text, t) {
  if (!cfg.stamps || !cfg.latency) return;
  STAMP_RE.lastIndex = 0;
  let m;
  while ((m = STAMP_RE.exec(text)) !== null) {
    res.latency_us.push(Math.round((t - Number(m[1])) / 1000));
  }
}

// ------------------------------------------------------------------------------ ws mode

function openSocket(url, deflate) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: !!deflate, handshakeTimeout: 20000 });
    const timer = setTimeout(() => reject(new Error('no welcome within 60 s')), 60000);
    ws.once('message', (data) => {
      clearTimeout(timer);
      const msg = JSON.parse(data.toString());
      if (msg.type !== 'welcome') reject(new Error('first frame was ' + msg.type));
      else resolve(ws);
    });
    ws.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

async function openAll(n, deflate) {
  // Open in bounded parallel batches so the accept queue does not overflow.
  const sockets = [];
  const batch = cfg.connect_batch || 50;
  for (let i = 0; i < n; i += batch) {
    const part = [];
    for (let j = i; j < Math.min(n, i + batch); j++) part.push(openSocket(cfg.url, deflate));
    const settled = await Promise.allSettled(part);
    for (const s of settled) {
      if (s.status === 'fulfilled') sockets.push(s.value);
      else {
        // One retry, alone: a handshake lost to a full accept queue (SYN retransmits) is a
        // property of the burst, not of the gateway.
        try {
          sockets.push(await openSocket(cfg.url, deflate));
          res.open_retried += 1;
        } catch (e) {
          res.open_failed += 1;
          if (res.errors.length < 10) res.errors.push('open: ' + e.message);
        }
      }
    }
  }
  return sockets;
}

class Slot {
  // One stream id on one socket, running `rounds` streams one after another.
  constructor(conn, id, index) {
    this.conn = conn;
    this.id = id;
    this.index = index;
    this.round = 0;
    this.reset();
  }
  reset() {
    this.seq = 0;
    this.parts = [];
    this.t0 = 0;
    this.first = false;
    this.tCancel = 0;
    this.tag = `${cfg.tag_prefix || 'b'}${process.pid}-${this.index}-${this.round}`;
  }
  start() {
    this.reset();
    this.t0 = now();
    this.conn.ws.send(JSON.stringify({ type: 'start', id: this.id, prompt: promptFor(this.tag) }));
  }
  onChunk(msg, t) {
    if (msg.seq !== this.seq + 1) problem(`${this.id}: seq ${msg.seq} after ${this.seq}`);
    this.seq = msg.seq;
    this.parts.push(msg.text);
    res.frames += 1;
    recordStamps(msg.text, t);
    if (!this.first) {
      this.first = true;
      if (cfg.ttfc && this.round >= (cfg.warmup_rounds || 0)) res.ttfc_us.push((t - this.t0) / 1000);
      this.conn.run.firstChunk();
      if (cfg.cancel) {
        this.tCancel = now();
        res.cancel_sent_ns[this.tag] = this.tCancel;
        this.conn.ws.send(JSON.stringify({ type: 'cancel', id: this.id }));
      }
    }
  }
  onEnd(msg, t) {
    if (msg.type === 'done') {
      const text = this.parts.join('');
      const expected = cfg.chunks;
      if (msg.seq !== this.seq) problem(`${this.id}: done.seq ${msg.seq} != ${this.seq}`);
      else if (msg.text !== text) problem(`${this.id}: done.text differs from the chunks`);
      else if (cfg.cancel) problem(`${this.id}: done although cancelled`);
      else {
        const n = countChunks(text);
        if (expected && n !== expected) problem(`${this.id}: ${n} chunks, expected ${expected}`);
        else {
          res.streams_ok += 1;
          res.upstream_chunks += n;
        }
      }
    } else if (msg.type === 'cancelled') {
      if (!cfg.cancel) problem(`${this.id}: unexpected cancelled`);
      else {
        res.cancelled += 1;
        res.streams_ok += 1;
        res.cancel_us.push((t - this.tCancel) / 1000);
      }
    } else {
      problem(`${this.id}: ${msg.code}: ${msg.message}`);
    }
    this.round += 1;
    if (this.round >= (cfg.rounds || 1)) this.conn.run.slotDone();
    else if (cfg.round_gap_ms) setTimeout(() => this.start(), cfg.round_gap_ms);
    else this.start();
  }
}

class Conn {
  constructor(ws, run, index) {
    this.ws = ws;
    this.run = run;
    this.slots = new Map();
    for (let j = 0; j < cfg.streams; j++) {
      const id = 's' + j;
      this.slots.set(id, new Slot(this, id, index * cfg.streams + j));
    }
    ws.on('message', (data) => this.onMessage(data));
    ws.on('close', (code) => {
      if (!run.stopping && run.pending > 0) {
        for (const slot of this.slots.values()) {
          if (slot.round < (cfg.rounds || 1)) {
            problem(`socket closed ${code} mid-stream`);
            slot.round = cfg.rounds || 1;
            run.slotDone();
          }
        }
      }
    });
  }
  onMessage(data) {
    const t = now();
    res.bytes += data.length;
    const msg = JSON.parse(data.toString());
    const slot = this.slots.get(msg.id);
    if (msg.type === 'text_chunk') {
      if (slot) slot.onChunk(msg, t);
      else problem(`text_chunk for unknown id ${msg.id}`);
    }
    else if (msg.type === 'done' || msg.type === 'cancelled' || msg.type === 'error') {
      if (slot) slot.onEnd(msg, t);
      else problem(`${msg.type} for unknown id ${msg.id}: ${msg.message || ''}`);
    }
  }
}

async function runWs() {
  const sockets = await openAll(cfg.sockets, cfg.deflate);
  const run = {
    pending: sockets.length * cfg.streams,
    waitingFirst: sockets.length * cfg.streams,
    stopping: false,
    finished: null,
    active: null,
    slotDone() {
      this.pending -= 1;
      if (this.pending === 0) this.finished();
    },
    firstChunk() {
      this.waitingFirst -= 1;
      if (this.waitingFirst === 0 && this.active) this.active();
    },
  };
  const done = new Promise((resolve) => (run.finished = resolve));
  const active = new Promise((resolve) => (run.active = resolve));
  const conns = sockets.map((ws, i) => new Conn(ws, run, i));
  emit({ event: 'ready', sockets: sockets.length });
  await waitFor('go');
  const cpu0 = process.cpuUsage();
  const t0 = now();
  const slots = [];
  for (const c of conns) for (const s of c.slots.values()) slots.push(s);
  slots.forEach((s, i) => {
    // stagger_ms spreads the starts (and so the paced upstream ticks) evenly over that window.
    if (cfg.stagger_ms) setTimeout(() => s.start(), (i / slots.length) * cfg.stagger_ms);
    else s.start();
  });
  if (run.pending === 0) run.finished();
  if (cfg.hold) {
    await active;
    emit({ event: 'active' });
    await waitFor('stop');
    run.stopping = true;
  } else {
    await done;
  }
  res.elapsed_s = (now() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  res.cpu_s = (cpu.user + cpu.system) / 1e6;
  await closeAll(sockets);
}

function closeAll(sockets) {
  return Promise.all(
    sockets.map(
      (ws) =>
        new Promise((resolve) => {
          if (ws.readyState === WebSocket.CLOSED) return resolve();
          const timer = setTimeout(() => {
            ws.terminate();
            resolve();
          }, 3000);
          ws.once('close', () => {
            clearTimeout(timer);
            resolve();
          });
          ws.close(1000);
        }),
    ),
  );
}

async function runIdle() {
  const sockets = await openAll(cfg.sockets, cfg.deflate);
  const accepted = sockets.filter((ws) => ws.extensions && ws.extensions.includes('permessage-deflate')).length;
  emit({ event: 'ready', sockets: sockets.length, deflate_accepted: accepted });
  await waitFor('stop');
  const t0 = now();
  await closeAll(sockets);
  res.elapsed_s = (now() - t0) / 1e9;
  res.streams_ok = sockets.length;
  res.deflate_accepted = accepted;
}

// ------------------------------------------------------------------------------ sse mode

const DELTA = '"delta":{"content":"';
function deltaContent(buf, from, to) {
  // The OpenAI chunk's choices[0].delta.content in buf[from:to] without a full JSON.parse
  // (3-4 us per event on this machine, which would make the load generator slower than the
  // gateway); any escape in the text falls back to JSON.parse.
  const i = buf.indexOf(DELTA, from);
  if (i < 0 || i >= to) return null; // role chunk, finish chunk, usage chunk, [DONE]
  const start = i + DELTA.length;
  const end = buf.indexOf('"', start);
  const text = buf.slice(start, end);
  if (text.indexOf('\\') < 0) return text;
  const choice = JSON.parse(buf.slice(from, to)).choices[0];
  return choice && choice.delta ? choice.delta.content : null;
}

function sseStream(agent, url, tag, round) {
  return new Promise((resolve) => {
    const body = JSON.stringify({
      model: 'bench',
      stream: true,
      messages: [{ role: 'user', content: promptFor(tag) }],
    });
    const t0 = now();
    const parts = [];
    let first = false;
    let finished = false;
    const req = http.request(
      {
        host: url.hostname,
        port: url.port,
        path: url.pathname,
        method: 'POST',
        agent,
        headers: {
          'Content-Type': 'application/json',
          Accept: 'text/event-stream',
          'Content-Length': Buffer.byteLength(body),
        },
      },
      (resp) => {
        if (resp.statusCode !== 200) {
          problem(`sse: HTTP ${resp.statusCode}`);
          resp.resume();
          resp.on('end', resolve);
          return;
        }
        let buf = '';
        resp.on('data', (d) => {
          const t = now();
          res.bytes += d.length;
          buf += d.toString('utf8');
          let pos = 0;
          let idx;
          while ((idx = buf.indexOf('\n\n', pos)) >= 0) {
            const from = pos + 6;
            const isData = buf.startsWith('data: ', pos);
            pos = idx + 2;
            if (!isData) continue;
            if (idx - from === 6 && buf.startsWith('[DONE]', from)) {
              finished = true;
              continue;
            }
            const text = deltaContent(buf, from, idx);
            if (!text) continue;
            parts.push(text);
            res.frames += 1;
            recordStamps(text, t);
            if (!first) {
              first = true;
              if (cfg.ttfc && round >= (cfg.warmup_rounds || 0)) res.ttfc_us.push((t - t0) / 1000);
            }
          }
          buf = buf.slice(pos);
        });
        resp.on('end', () => {
          const n = countChunks(parts.join(''));
          if (!finished) problem('sse: no [DONE]');
          else if (cfg.chunks && n !== cfg.chunks) problem(`sse: ${n} chunks, expected ${cfg.chunks}`);
          else {
            res.streams_ok += 1;
            res.upstream_chunks += n;
          }
          resolve();
        });
        resp.on('error', (e) => {
          problem('sse: ' + e.message);
          resolve();
        });
      },
    );
    req.on('error', (e) => {
      problem('sse request: ' + e.message);
      resolve();
    });
    req.end(body);
  });
}

async function runSse() {
  const warmChunks = cfg.chunks;
  const warmLatency = cfg.latency;
  const warmTtfc = cfg.ttfc;
  const url = new URL(cfg.url);
  const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 1e6 });
  const slots = cfg.sockets * cfg.streams;
  if (cfg.warm_prompt) {
    // Open the keep-alive connections first, as the gateway's upstream pool has them open
    // after its warm-up: the measured streams then reuse them.
    const warm = { ...cfg, prompt: cfg.warm_prompt, chunks: 0, latency: false, ttfc: false };
    const saved = cfg.prompt;
    Object.assign(cfg, warm);
    // The warm-up streams last (warm_prompt paces them): started 2 ms apart they hold `slots`
    // connections at once, so that many stay in the agent's free pool.
    const pending = [];
    for (let i = 0; i < slots; i++) {
      pending.push(sseStream(agent, url, `w${process.pid}-${i}`, 0));
      await new Promise((r) => setTimeout(r, 2));
    }
    await Promise.all(pending);
    Object.assign(cfg, { prompt: saved, chunks: warmChunks, latency: warmLatency, ttfc: warmTtfc });
    Object.assign(res, { streams_ok: 0, upstream_chunks: 0, frames: 0, bytes: 0 });
  }
  emit({ event: 'ready', sockets: slots });
  await waitFor('go');
  const cpu0 = process.cpuUsage();
  const t0 = now();
  const runs = [];
  for (let i = 0; i < slots; i++) {
    runs.push(
      (async () => {
        if (cfg.stagger_ms) await new Promise((r) => setTimeout(r, (i / slots) * cfg.stagger_ms));
        for (let r = 0; r < (cfg.rounds || 1); r++) {
          await sseStream(agent, url, `${cfg.tag_prefix || 'd'}${process.pid}-${i}-${r}`, r);
        }
      })(),
    );
  }
  await Promise.all(runs);
  res.elapsed_s = (now() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  res.cpu_s = (cpu.user + cpu.system) / 1e6;
  agent.destroy();
}

// ------------------------------------------------------------------------------ main

(async () => {
  try {
    if (cfg.mode === 'ws') await runWs();
    else if (cfg.mode === 'sse') await runSse();
    else if (cfg.mode === 'idle') await runIdle();
    else throw new Error('unknown mode ' + cfg.mode);
  } catch (e) {
    res.errors.push(String(e && e.stack ? e.stack : e));
    res.streams_failed += 1;
  }
  // A pipe write is asynchronous: exit only once the (possibly megabytes long) result is out.
  process.stdout.write(JSON.stringify(res) + '\n', () => process.exit(0));
})();
