// Small DOM and formatting helpers shared by every page.

/**
 * Builds an element: h('a', { href: '#/', class: 'x', onclick: fn }, 'text', child).
 * Attributes starting with "on" become listeners; `null`/`false` children are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function focusKey(e) {
  const text = e.matches('input, select, textarea') ? '' : e.textContent.trim().slice(0, 80);
  return [e.tagName, e.id, e.getAttribute('href'), e.getAttribute('aria-label'), e.getAttribute('name'), text].join('|');
}

/**
 * Replaces an element's children. Live pages re-render often: when the focused element
 * was inside, the element that looks the same afterwards gets the focus back, so keyboard
 * users never lose their place.
 */
export function replace(el, ...children) {
  const active = document.activeElement;
  const key = active && active !== el && el.contains(active) ? focusKey(active) : null;
  el.replaceChildren();
  append(el, children);
  if (key) {
    const again = [...el.querySelectorAll(active.tagName)].find((e) => focusKey(e) === key);
    again?.focus({ preventScroll: true });
  }
}

let idCounter = 0;
export function uid(prefix = 'f') {
  idCounter += 1;
  return `${prefix}-${idCounter}`;
}

/** A labelled form field: returns { wrap, input }. */
export function field(label, input, hint) {
  if (!input.id) input.id = uid('in');
  const hintEl = hint ? h('small', { class: 'hint', id: `${input.id}-hint` }, hint) : null;
  if (hintEl) input.setAttribute('aria-describedby', hintEl.id);
  return h('div', { class: 'field' }, h('label', { for: input.id }, label), input, hintEl);
}

export function fmtSecs(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return '–';
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function fmtBytes(b) {
  if (b === null || b === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = b;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

/** A write rate: bytes per second (and, when given, write commands per second). */
export function fmtRate(bytesPerSec, iops = null) {
  if (bytesPerSec === null || bytesPerSec === undefined) return '–';
  const rate = bytesPerSec > 0 && bytesPerSec < 1 ? '< 1 B/s' : `${fmtBytes(bytesPerSec)}/s`;
  if (iops === null || iops === undefined) return rate;
  return `${rate} · ${iops >= 10 || iops === 0 ? Math.round(iops) : iops.toFixed(1)} IOPS`;
}

export function fmtTime(iso) {
  if (!iso) return '–';
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
}

export function fmtAgo(iso) {
  if (!iso) return '–';
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 0) return 'now';
  return `${fmtSecs(s)} ago`;
}
