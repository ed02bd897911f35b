// The console's entry point: sign-in, the live store, the hash router, the page shell.
//
// Map (plain ES modules, no build step; the manager serves web/ as is):
//   api.js         REST client: bearer token (sessionStorage), problem-details errors
//   live.js        the WebSocket stream: snapshot + deltas, reconnect with ?since=, samples
//   lookups.js     display words for the API's codes (GET /api/v1/lookups)
//   dom.js         element builder, focus-keeping re-render, number/time formats
//   components.js  status badges, sparkline and line chart (inline SVG), progress bar,
//                  problem box
//   ops.js         recovery operations: buttons, confirmation dialogs, live progress,
//                  recovery report tables
//   pages/*.js     one module per page: mount(root, ctx, params) -> { update(store), unmount() }

import { api, getToken, setToken, ApiError } from './api.js';
import { loadLookups } from './lookups.js';
import { LiveStore } from './live.js';
import { h, replace } from './dom.js';
import { problemBox } from './components.js';
import * as dashboard from './pages/dashboard.js';
import * as vpgList from './pages/vpgs.js';
import * as vpgDetail from './pages/vpg.js';
import * as wizard from './pages/wizard.js';
import * as alerts from './pages/alerts.js';
import * as events from './pages/events.js';
import * as reports from './pages/reports.js';

const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };

const routes = [
  { re: /^\/?$/, page: dashboard, nav: 'dashboard' },
  { re: /^\/vpgs$/, page: vpgList, nav: 'vpgs' },
  { re: /^\/vpgs\/new$/, page: wizard, nav: 'vpgs', need: 'admin' },
  { re: /^\/vpgs\/([^/]+)\/edit$/, page: wizard, nav: 'vpgs', need: 'admin', keys: ['id'] },
  { re: /^\/vpgs\/([^/]+)$/, page: vpgDetail, nav: 'vpgs', keys: ['id'] },
  { re: /^\/alerts$/, page: alerts, nav: 'alerts' },
  { re: /^\/events$/, page: events, nav: 'events' },
  { re: /^\/reports$/, page: reports, nav: 'reports' },
  { re: /^\/reports\/([^/]+)$/, page: reports, nav: 'reports', keys: ['id'] },
];

const view = document.getElementById('view');
const top = document.getElementById('top');
let ctx = null;
let current = null;

function showStream(store) {
  const el = document.getElementById('stream-state');
  const words = { connecting: 'Connecting…', live: 'Live', disconnected: 'Disconnected — reconnecting…' };
  el.dataset.state = store.status;
  el.textContent = words[store.status] || store.status;
  const open = store.openAlerts().length;
  document.getElementById('nav-alerts').textContent = open ? String(open) : '';
}

function route() {
  if (!ctx) return;
  const path = decodeURIComponent(location.hash.replace(/^#/, '').split('?')[0]) || '/';
  let match = null;
  let params = {};
  for (const r of routes) {
    const m = path.match(r.re);
    if (m) {
      match = r;
      params = Object.fromEntries((r.keys || []).map((k, i) => [k, m[i + 1]]));
      break;
    }
  }
  current?.unmount?.();
  current = null;
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (match && a.dataset.nav === match.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!match) {
    replace(view, h('h1', {}, 'Not found'), h('p', {}, 'No page at ', h('code', {}, path), '. ', h('a', { href: '#/' }, 'Dashboard')));
    return;
  }
  if (match.need && !ctx.can(match.need)) {
    replace(view, h('h1', {}, 'Not allowed'), h('p', {}, `This page needs the ${match.need} role; you are signed in as ${ctx.session.role}.`));
    return;
  }
  view.replaceChildren();
  current = match.page.mount(view, ctx, params) || {};
  if (ctx.store.hasSnapshot) current.update?.(ctx.store);
}

async function start(token) {
  const session = await api('/session', { token });
  setToken(token);
  await loadLookups();
  const store = new LiveStore(token);
  ctx = {
    session,
    store,
    can: (role) => ROLE_RANK[session.role] >= ROLE_RANK[role],
    navigate: (hash) => { location.hash = hash; },
  };
  document.body.dataset.role = session.role;
  replace(document.getElementById('who'),
    h('span', { class: 'name' }, session.name), ' ',
    h('span', { class: 'role', id: 'role', dataset: { role: session.role } }, session.role));
  top.hidden = false;
  store.subscribe((s) => {
    showStream(s);
    current?.update?.(s);
  });
  store.start();
  // While the stream is down, ask whether the token still works: a revoked or expired
  // token would otherwise look like a network outage forever.
  const sessionCheck = setInterval(async () => {
    if (ctx?.store !== store) { clearInterval(sessionCheck); return; }
    if (store.status !== 'disconnected') return;
    try {
      await api('/session', { token });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        clearInterval(sessionCheck);
        signOut(err);
      }
    }
  }, 5000);
  route();
}

function signIn(error) {
  top.hidden = true;
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'off', required: true,
    spellcheck: 'false', placeholder: 'bwk_…' });
  const errSlot = h('div', {}, error ? problemBox(error) : null);
  const form = h('form', { class: 'signin card', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to Bulwark'),
    h('div', { class: 'field' },
      h('label', { for: 'token' }, 'API token'), input,
      h('small', { class: 'hint' }, 'Printed at the manager’s first start; more with ', h('code', {}, 'bulwark token create'), '.')),
    errSlot,
    h('button', { type: 'submit', class: 'primary' }, 'Sign in'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const btn = form.querySelector('button');
    btn.disabled = true;
    try {
      await start(input.value.trim());
    } catch (err) {
      replace(errSlot, problemBox(err instanceof ApiError ? err : new ApiError(0, { title: 'Error', detail: String(err) })));
      btn.disabled = false;
      input.focus();
    }
  });
  replace(view, form);
  input.focus();
}

function signOut(error) {
  setToken(null);
  ctx?.store.stop();
  current?.unmount?.();
  current = null;
  ctx = null;
  delete document.body.dataset.role;
  signIn(error);
}

document.getElementById('sign-out').addEventListener('click', () => signOut());

window.addEventListener('hashchange', () => {
  route();
  // Screen readers and keyboards start at the new page, not at the link that led there.
  if (ctx) view.focus({ preventScroll: true });
});

const saved = getToken();
if (saved) {
  start(saved).catch((err) => { setToken(null); signIn(err); });
} else {
  signIn();
}
