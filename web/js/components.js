// Shared pieces: status badge, sparkline and line chart (inline SVG), progress bar,
// problem (API error) box.

import { h, fmtSecs, fmtRate } from './dom.js';
import { label } from './lookups.js';

const SVG = 'http://www.w3.org/2000/svg';

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const c of children) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

export function statusTone(status) {
  switch (status) {
    case 'meeting_sla': return 'ok';
    case 'initializing':
    case 'history_not_meeting_sla': return 'warn';
    case 'not_meeting_sla':
    case 'rpo_not_meeting_sla': return 'bad';
    case 'failing_over':
    case 'moving':
    case 'deleting': return 'busy';
    default: return 'info';
  }
}

/** Status and sub-status in the manager's words. */
export function statusBadge(vpg) {
  const sub = label('vpg_sub_statuses', vpg.sub_status);
  return h('span', { class: 'status' },
    h('span', { class: `badge ${statusTone(vpg.status)}`, dataset: { status: vpg.status } },
      label('vpg_statuses', vpg.status)),
    sub ? h('span', { class: 'substatus', dataset: { subStatus: vpg.sub_status } }, sub) : null);
}

export function replicationBadge(state) {
  const tone = { replication_enabled: 'ok', error: 'bad', resynchronization_required: 'bad',
    paused: 'warn', resynchronize_suspended: 'warn', pending_initial_replication: 'busy',
    resynchronizing: 'busy' }[state] || 'info';
  return h('span', { class: `badge ${tone}`, dataset: { state } }, label('vm_replication_states', state));
}

/**
 * A small line of `vals` [{at, v}] (nulls already left out) scaled to `max`, with an
 * optional dashed `target`. data-points / data-first: how many values are drawn and the
 * oldest one's time (tests).
 */
function spark(vals, { title, max, target = null, bad = false, width = 120, height = 28 }) {
  const svg = s('svg', { class: 'spark', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': title,
    'data-points': vals.length, 'data-first': vals.length ? vals[0].at : null }, s('title', {}, title));
  if (vals.length < 2) return svg;
  const t0 = Date.parse(vals[0].at);
  const t1 = Date.parse(vals[vals.length - 1].at);
  const top = max * 1.1 || 1;
  const x = (t) => (t1 === t0 ? 0 : ((t - t0) / (t1 - t0)) * (width - 2) + 1);
  const y = (v) => height - 1 - (v / top) * (height - 2);
  if (target) svg.append(s('line', { class: 'target', x1: 0, x2: width, y1: y(target), y2: y(target) }));
  const d = vals.map((p, i) => `${i ? 'L' : 'M'}${x(Date.parse(p.at)).toFixed(1)},${y(p.v).toFixed(1)}`).join('');
  svg.append(s('path', { class: bad ? 'line bad' : 'line', d }));
  return svg;
}

const present = (points, key) => points
  .filter((p) => p[key] !== null && p[key] !== undefined)
  .map((p) => ({ at: p.at, v: p[key] }));

/**
 * A small RPO sparkline: `points` [{at, rpo}] (seconds, null = none), `target` drawn as a
 * dashed line. The accessible name states the latest value and the target.
 */
export function sparkline(points, target, size = {}) {
  const vals = present(points, 'rpo');
  const last = vals.length ? vals[vals.length - 1].v : null;
  return spark(vals, {
    ...size,
    title: `RPO ${fmtSecs(last)}, target ${fmtSecs(target)}, last ${points.length} samples`,
    max: Math.max(target || 0, ...vals.map((p) => p.v)),
    target,
    bad: last !== null && target && last > target,
  });
}

/**
 * A small write-rate sparkline: `points` [{at, bytes}] (bytes per second), scaled to its
 * own peak. The accessible name states the latest rate and the peak.
 */
export function rateSparkline(points, name, size = {}) {
  const vals = present(points, 'bytes');
  const last = vals.length ? vals[vals.length - 1].v : null;
  const peak = Math.max(0, ...vals.map((p) => p.v));
  return spark(vals, {
    ...size,
    title: `${name}: ${fmtRate(last)} now, peak ${fmtRate(peak)} over the last ${vals.length} samples`,
    max: peak,
  });
}

/**
 * A larger line chart with axes: `samples` [{at, value}] (null = gap), `target` line,
 * `fmt` formats the y axis.
 */
export function lineChart(samples, { target = null, fmt = fmtSecs, label: name = 'chart', from = null, to = null, width = 640, height = 180 } = {}) {
  const pad = { l: 56, r: 8, t: 8, b: 22 };
  const vals = samples.filter((p) => p.value !== null && p.value !== undefined);
  const svg = s('svg', { class: 'chart', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': name },
    s('title', {}, name));
  if (!samples.length) return svg;
  // The x axis spans the asked range (`from`..`to`) when given, else the samples'.
  const t0 = from ?? Date.parse(samples[0].at);
  const t1 = to ?? Date.parse(samples[samples.length - 1].at);
  const max = Math.max(target || 0, ...vals.map((p) => p.value), 1) * 1.1;
  const x = (t) => pad.l + (t1 === t0 ? 0 : ((t - t0) / (t1 - t0)) * (width - pad.l - pad.r));
  const y = (v) => pad.t + (1 - v / max) * (height - pad.t - pad.b);
  for (const f of [0, 0.5, 1]) {
    const v = max * f;
    svg.append(s('line', { class: 'grid', x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v) }),
      s('text', { x: pad.l - 4, y: y(v) + 4, 'text-anchor': 'end' }, fmt(v)));
  }
  const tl = (t) => new Date(t).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
  svg.append(s('text', { x: pad.l, y: height - 4 }, tl(t0)),
    s('text', { x: width - pad.r, y: height - 4, 'text-anchor': 'end' }, tl(t1)));
  if (target) svg.append(s('line', { class: 'target', x1: pad.l, x2: width - pad.r, y1: y(target), y2: y(target) }));
  let d = '';
  let pen = false;
  for (const p of samples) {
    if (p.value === null || p.value === undefined) { pen = false; continue; }
    d += `${pen ? 'L' : 'M'}${x(Date.parse(p.at)).toFixed(1)},${y(p.value).toFixed(1)}`;
    pen = true;
  }
  svg.append(s('path', { class: 'line', d }));
  return svg;
}

export function progressBar(fraction, name) {
  const pct = Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)));
  return h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100,
    'aria-valuenow': pct, 'aria-label': name },
  h('div', { class: 'bar', style: `width:${pct}%` }), h('span', { class: 'pct' }, `${pct} %`));
}

/** The manager's problem document, as an alert region. */
export function problemBox(err) {
  if (!err) return h('div', { class: 'problem-slot', role: 'alert' });
  const p = err.problem || {};
  return h('div', { class: 'problem', role: 'alert', dataset: { code: p.code || '' } },
    h('strong', {}, p.title || err.title || 'Error'),
    ' ', h('span', { class: 'detail' }, p.detail || err.message),
    p.field ? h('div', { class: 'meta' }, 'Field: ', h('code', {}, p.field)) : null,
    p.code ? h('div', { class: 'meta' }, 'Code: ', h('code', {}, p.code)) : null);
}
