// VPG list: name, sites, status and sub-status, RPO with a live sparkline, journal
// history and size, write throughput and IOPS, VM count; sortable columns and filters
// (kept in the URL hash query).

import { h, replace, fmtSecs, fmtBytes, fmtRate, field } from '../dom.js';
import { label, values } from '../lookups.js';
import { statusBadge, sparkline } from '../components.js';

const COLUMNS = [
  { key: 'name', title: 'Name', get: (v) => v.name.toLowerCase() },
  { key: 'sites', title: 'Protected → recovery site', get: (v, s) => `${siteName(s, v.protected_site_id)} ${siteName(s, v.recovery_site_id)}` },
  { key: 'status', title: 'Status', get: (v) => `${label('vpg_statuses', v.status)} ${label('vpg_sub_statuses', v.sub_status)}` },
  { key: 'rpo', title: 'RPO / target', get: (v) => v.rpo_actual_secs ?? Infinity },
  { key: 'history', title: 'Journal history / target', get: (v) => v.history_actual_secs ?? -1 },
  { key: 'journal', title: 'Journal size', get: (v) => v.journal_bytes },
  { key: 'throughput', title: 'Throughput', get: (v, s) => s.throughput.get(v.id)?.bytes ?? 0 },
  { key: 'vms', title: 'VMs', get: (v) => v.vm_count },
];

function siteName(store, id) {
  if (!id) return '–';
  return store.sites.get(id)?.name ?? id;
}

function readQuery() {
  const q = new URLSearchParams(location.hash.split('?')[1] || '');
  return { sort: q.get('sort') || 'name', dir: q.get('dir') === 'desc' ? 'desc' : 'asc',
    name: q.get('name') || '', status: q.get('status') || '', site: q.get('site') || '' };
}

export function mount(root, ctx) {
  const state = readQuery();
  let store = ctx.store;

  const nameIn = h('input', { type: 'search', id: 'filter-name', value: state.name, autocomplete: 'off' });
  const statusSel = h('select', { id: 'filter-status' },
    h('option', { value: '' }, 'Any status'),
    values('vpg_statuses').map((s) => h('option', { value: s.id, selected: s.id === state.status }, s.label)));
  const siteSel = h('select', { id: 'filter-site' }, h('option', { value: '' }, 'Any site'));
  const sortSel = h('select', { id: 'sort-by' }, COLUMNS.flatMap((c) => ['asc', 'desc'].map((d) =>
    h('option', { value: `${c.key}:${d}` }, `${c.title} ${d === 'asc' ? '▲' : '▼'}`))));
  sortSel.value = `${state.sort}:${state.dir}`;
  sortSel.addEventListener('change', () => {
    [state.sort, state.dir] = sortSel.value.split(':');
    syncHash(); renderHead(); render();
  });
  const count = h('p', { class: 'muted', id: 'vpg-count', 'aria-live': 'polite' });
  const thead = h('thead');
  const tbody = h('tbody');
  const table = h('table', { class: 'grid', id: 'vpg-table' }, h('caption', { class: 'sr-only' }, 'Virtual protection groups'), thead, tbody);

  const syncHash = () => {
    const q = new URLSearchParams();
    for (const k of ['sort', 'dir', 'name', 'status', 'site']) if (state[k]) q.set(k, state[k]);
    history.replaceState(null, '', `#/vpgs?${q}`);
  };
  nameIn.addEventListener('input', () => { state.name = nameIn.value; syncHash(); render(); });
  statusSel.addEventListener('change', () => { state.status = statusSel.value; syncHash(); render(); });
  siteSel.addEventListener('change', () => { state.site = siteSel.value; syncHash(); render(); });

  function renderHead() {
    replace(thead, h('tr', {}, COLUMNS.map((c) => {
      const active = state.sort === c.key;
      return h('th', { scope: 'col', 'aria-sort': active ? (state.dir === 'asc' ? 'ascending' : 'descending') : 'none' },
        h('button', { type: 'button', class: 'sort', dataset: { sort: c.key }, onclick: () => {
          if (state.sort === c.key) state.dir = state.dir === 'asc' ? 'desc' : 'asc';
          else { state.sort = c.key; state.dir = 'asc'; }
          sortSel.value = `${state.sort}:${state.dir}`;
          syncHash(); renderHead(); render();
        } }, c.title, h('span', { class: 'arrow', 'aria-hidden': 'true' }, active ? (state.dir === 'asc' ? ' ▲' : ' ▼') : '')));
    })));
  }

  function renderSites() {
    const have = new Set([...siteSel.options].map((o) => o.value));
    for (const s of [...store.sites.values()].sort((a, b) => a.name.localeCompare(b.name))) {
      if (!have.has(s.id)) siteSel.append(h('option', { value: s.id, selected: s.id === state.site }, s.name));
    }
  }

  function render() {
    const col = COLUMNS.find((c) => c.key === state.sort) || COLUMNS[0];
    const needle = state.name.trim().toLowerCase();
    const rows = [...store.vpgs.values()]
      .filter((v) => !needle || v.name.toLowerCase().includes(needle))
      .filter((v) => !state.status || v.status === state.status)
      .filter((v) => !state.site || v.protected_site_id === state.site || v.recovery_site_id === state.site)
      .sort((a, b) => {
        const x = col.get(a, store);
        const y = col.get(b, store);
        const r = x < y ? -1 : x > y ? 1 : a.name.localeCompare(b.name);
        return state.dir === 'asc' ? r : -r;
      });
    count.textContent = `${rows.length} of ${store.vpgs.size} VPGs`;
    replace(tbody, rows.length ? rows.map((v) => {
      const s = v.settings;
      const rpoBad = v.rpo_actual_secs !== null && v.rpo_actual_secs > s.rpo_target_secs;
      // The manager decides whether history misses its target (a young VPG has not filled it yet).
      const histBad = v.status === 'history_not_meeting_sla' || v.status === 'not_meeting_sla';
      return h('tr', { dataset: { vpg: v.name, id: v.id } },
        h('th', { scope: 'row', 'data-label': 'Name' }, h('a', { href: `#/vpgs/${v.id}` }, v.name)),
        h('td', { 'data-label': 'Sites' }, `${siteName(store, v.protected_site_id)} → ${siteName(store, v.recovery_site_id)}`),
        h('td', { 'data-label': 'Status', class: 'status-cell' }, statusBadge(v)),
        h('td', { 'data-label': 'RPO', class: 'num' },
          h('span', { class: rpoBad ? 'bad-text' : '' }, fmtSecs(v.rpo_actual_secs)), ` / ${fmtSecs(s.rpo_target_secs)} `,
          sparkline(store.samples.get(v.id) || [], s.rpo_target_secs)),
        h('td', { 'data-label': 'History', class: 'num' },
          h('span', { class: histBad ? 'warn-text' : '' }, fmtSecs(v.history_actual_secs)), ` / ${fmtSecs(s.journal_history_secs)}`),
        h('td', { 'data-label': 'Journal', class: 'num' }, fmtBytes(v.journal_bytes)),
        (() => {
          const t = store.throughput.get(v.id);
          return h('td', { 'data-label': 'Throughput', class: 'num', dataset: { throughput: t ? t.bytes : '' } },
            t ? fmtRate(t.bytes, t.iops) : '–');
        })(),
        h('td', { 'data-label': 'VMs', class: 'num' }, String(v.vm_count)));
    }) : h('tr', {}, h('td', { colspan: COLUMNS.length, class: 'muted' }, store.hasSnapshot ? 'No VPG matches.' : 'Loading…')));
  }

  replace(root,
    h('div', { class: 'page-head' }, h('h1', {}, 'VPGs'),
      ctx.can('admin') ? h('a', { class: 'button primary', href: '#/vpgs/new', id: 'new-vpg' }, 'New VPG') : null),
    h('form', { class: 'filters', role: 'search', 'aria-label': 'Filter VPGs', onsubmit: (e) => e.preventDefault() },
      field('Name contains', nameIn), field('Status', statusSel), field('Site', siteSel),
      h('div', { class: 'narrow-only' }, field('Sort by', sortSel))),
    count,
    h('div', { class: 'table-wrap' }, table));
  renderHead();

  return {
    update(s) { store = s; renderSites(); render(); },
  };
}
