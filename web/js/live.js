// The live stream (GET /api/v1/stream, WebSocket): a snapshot, then deltas with `seq`.
// Keeps the state every page reads, reconnects by itself with `?since=<seq>` so no delta
// is missed, and tells subscribers about changes (at most a few times a second).
import { api } from './api.js';

const SAMPLE_KEEP = 600; // per VPG: ten minutes of one-per-second samples
const SEED_VPGS = 50; // VPGs whose sparklines are seeded from the RPO history
const EVENT_KEEP = 500;

export class LiveStore {
  constructor(token) {
    this.token = token;
    this.seq = null;
    this.status = 'connecting'; // connecting | live | disconnected
    this.hasSnapshot = false;
    this.vpgs = new Map();
    this.alerts = new Map();
    this.tasks = new Map();
    this.sites = new Map();
    this.hosts = new Map();
    this.events = [];
    this.samples = new Map();
    this.throughput = new Map(); // VPG id -> { bytes, iops } per second, latest
    this.totals = []; // [{ at, bytes, iops }]: all VPGs together, for the dashboard
    this.lastFrameAt = null;
    this.reconnects = 0;
    this.listeners = new Set();
    this.ws = null;
    this.retryMs = 500;
    this.retryTimer = null;
    this.notifyTimer = null;
    this.closed = false;
  }

  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  notify(now = false) {
    if (now) {
      clearTimeout(this.notifyTimer);
      this.notifyTimer = null;
      for (const fn of [...this.listeners]) fn(this);
      return;
    }
    if (this.notifyTimer) return;
    this.notifyTimer = setTimeout(() => this.notify(true), 250);
  }

  start() {
    this.closed = false;
    this.connect();
  }

  stop() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000, 'signed out');
    this.ws = null;
  }

  setStatus(s) {
    if (this.status === s) return;
    this.status = s;
    this.notify(true);
  }

  connect() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const q = new URLSearchParams({ access_token: this.token });
    if (this.seq !== null) q.set('since', String(this.seq));
    let ws;
    try {
      ws = new WebSocket(`${proto}//${location.host}/api/v1/stream?${q}`);
    } catch {
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      this.retryMs = 500;
      this.apply(frame);
      this.setStatus('live');
    };
    ws.onclose = () => {
      if (ws !== this.ws) return;
      this.ws = null;
      if (this.closed) return;
      this.setStatus('disconnected');
      this.scheduleRetry();
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  scheduleRetry() {
    clearTimeout(this.retryTimer);
    const wait = this.retryMs;
    this.retryMs = Math.min(this.retryMs * 2, 5000);
    this.retryTimer = setTimeout(() => {
      if (this.closed) return;
      this.reconnects += 1;
      this.connect();
    }, wait);
  }

  apply(frame) {
    this.lastFrameAt = frame.at;
    if (frame.type === 'snapshot') {
      this.vpgs = new Map(frame.vpgs.map((v) => [v.id, v]));
      this.alerts = new Map(frame.alerts.map((a) => [a.id, a]));
      this.tasks = new Map(frame.tasks.map((t) => [t.id, t]));
      this.sites = new Map(frame.sites.map((s) => [s.id, s]));
      this.hosts = new Map(frame.hosts.map((h) => [h.id, h]));
      this.events = frame.events.slice(-EVENT_KEEP);
      // The manager's latest sample per VPG carries throughput; a VPG without one has
      // its record's figures and no writes measured yet.
      const latest = new Map((frame.samples || []).map((x) => [x.id, x]));
      this.throughput = new Map();
      for (const v of frame.vpgs) {
        const x = latest.get(v.id);
        this.applySample({ id: v.id, at: frame.at, rpo_actual_secs: v.rpo_actual_secs,
          history_actual_secs: v.history_actual_secs, journal_bytes: v.journal_bytes,
          throughput_bytes_per_sec: x ? x.throughput_bytes_per_sec : 0, iops: x ? x.iops : 0 });
      }
      for (const id of [...this.samples.keys()]) if (!this.vpgs.has(id)) this.samples.delete(id);
      this.pushTotal(frame.at);
      if (!this.hasSnapshot) this.seedSamples(frame.vpgs.map((v) => v.id));
      this.hasSnapshot = true;
    } else if (frame.type === 'delta') {
      for (const v of frame.vpgs || []) this.vpgs.set(v.id, v);
      for (const id of frame.vpgs_removed || []) {
        this.vpgs.delete(id); this.samples.delete(id); this.throughput.delete(id);
      }
      for (const x of frame.samples || []) {
        const v = this.vpgs.get(x.id);
        if (v) {
          this.vpgs.set(x.id, { ...v, rpo_actual_secs: x.rpo_actual_secs,
            history_actual_secs: x.history_actual_secs, journal_bytes: x.journal_bytes });
        }
        this.applySample(x);
      }
      if (frame.samples?.length || frame.vpgs_removed?.length) this.pushTotal(frame.at);
      for (const a of frame.alerts || []) this.alerts.set(a.id, a);
      for (const t of frame.tasks || []) this.tasks.set(t.id, t);
      for (const s of frame.sites || []) this.sites.set(s.id, s);
      for (const id of frame.sites_removed || []) this.sites.delete(id);
      for (const h of frame.hosts || []) this.hosts.set(h.id, h);
      for (const id of frame.hosts_removed || []) this.hosts.delete(id);
      if (frame.events?.length) {
        const known = new Set(this.events.map((e) => e.id));
        for (const e of frame.events) if (!known.has(e.id)) this.events.push(e);
        if (this.events.length > EVENT_KEEP) this.events.splice(0, this.events.length - EVENT_KEEP);
      }
    } else {
      return;
    }
    this.seq = frame.seq;
    this.notify();
  }

  /**
   * Sparklines start from the manager's RPO history (the last ten minutes) instead of
   * empty: one request per VPG, for the first SEED_VPGS of them, after the first
   * snapshot. Samples already received from the stream win.
   */
  async seedSamples(ids) {
    const since = new Date(Date.now() - SAMPLE_KEEP * 1000).toISOString();
    for (const id of ids.slice(0, SEED_VPGS)) {
      if (this.closed) return;
      let hist;
      try {
        hist = await api(`/vpgs/${id}/rpo-history?since=${encodeURIComponent(since)}&max_points=${SAMPLE_KEEP}`, { token: this.token });
      } catch {
        continue; // a history that cannot be read leaves the live samples alone
      }
      const list = this.samples.get(id) || [];
      const first = list.length ? Date.parse(list[0].at) : Infinity;
      const older = hist.samples
        .filter((p) => Date.parse(p.at) < first)
        .map((p) => ({ at: p.at, rpo: p.rpo_ms === null ? null : p.rpo_ms / 1000, history: p.history_secs, journal: null, throughput: null }));
      if (!older.length) continue;
      const merged = older.concat(list);
      this.samples.set(id, merged.slice(-SAMPLE_KEEP));
      this.notify();
    }
  }

  /** A VPG's figures from the stream: its current throughput, and one sparkline point. */
  applySample(x) {
    this.throughput.set(x.id, { bytes: x.throughput_bytes_per_sec ?? 0, iops: x.iops ?? 0 });
    this.pushSample(x);
  }

  pushSample(x) {
    let list = this.samples.get(x.id);
    if (!list) { list = []; this.samples.set(x.id, list); }
    const t = Date.parse(x.at);
    if (list.length && Date.parse(list[list.length - 1].at) >= t) return;
    list.push({ at: x.at, rpo: x.rpo_actual_secs, history: x.history_actual_secs, journal: x.journal_bytes,
      throughput: x.throughput_bytes_per_sec ?? null });
    if (list.length > SAMPLE_KEEP) list.splice(0, list.length - SAMPLE_KEEP);
  }

  /** Throughput and IOPS of every VPG together, now. */
  totalThroughput() {
    let bytes = 0;
    let iops = 0;
    for (const t of this.throughput.values()) { bytes += t.bytes; iops += t.iops; }
    return { bytes, iops };
  }

  /** One point of the all-VPG throughput line per frame that moved it. */
  pushTotal(at) {
    const { bytes, iops } = this.totalThroughput();
    const last = this.totals[this.totals.length - 1];
    if (last && Date.parse(last.at) >= Date.parse(at)) return;
    this.totals.push({ at, bytes, iops });
    if (this.totals.length > SAMPLE_KEEP) this.totals.splice(0, this.totals.length - SAMPLE_KEEP);
  }

  openAlerts() {
    return [...this.alerts.values()].filter((a) => !a.cleared_at);
  }
}
