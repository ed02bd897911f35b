// Recovery reports: every failover test, failover and move, newest first (optionally of
// one VPG), and one report in detail with each step's timing and result.

import { api } from '../api.js';
import { h, replace } from '../dom.js';
import { problemBox } from '../components.js';
import { reportTable, reportDetail, kindWord } from '../ops.js';

export function mount(root, ctx, { id } = {}) {
  const body = h('div', {});
  let gone = false;
  if (id) {
    replace(root, h('p', { class: 'crumbs' }, h('a', { href: '#/reports' }, 'Recovery reports'), ' / '),
      h('h1', { id: 'report-title' }, 'Recovery report'), body);
    api(`/reports/${encodeURIComponent(id)}`).then((r) => {
      if (gone) return;
      root.querySelector('#report-title').textContent = `${kindWord(r.kind)} of ${r.vpg_name}`;
      replace(body, reportDetail(r));
    }).catch((err) => { if (!gone) replace(body, problemBox(err)); });
    return { unmount() { gone = true; } };
  }
  const vpgSel = h('select', { id: 'report-vpg' }, h('option', { value: '' }, 'All VPGs'));
  // A page of 100 at a time; "Older reports" follows the manager's cursor.
  let items = [];
  let cursor = null;
  const load = async (more = false) => {
    const q = new URLSearchParams({ limit: '100' });
    if (vpgSel.value) q.set('vpg', vpgSel.value);
    if (more && cursor) q.set('cursor', cursor);
    try {
      const page = await api(`/reports?${q}`);
      items = more ? items.concat(page.items) : page.items;
      cursor = page.next_cursor;
      if (gone) return;
      replace(body, reportTable(items, { id: 'report-table', showVpg: true, href: (r) => `#/reports/${r.id}` }),
        cursor ? h('p', {}, h('button', { type: 'button', id: 'older-reports', onclick: () => load(true) }, 'Older reports')) : null);
    } catch (err) {
      if (!gone) replace(body, problemBox(err));
    }
  };
  vpgSel.addEventListener('change', () => load());
  replace(root, h('div', { class: 'section-head' }, h('h1', {}, 'Recovery reports'),
    h('div', { class: 'field' }, h('label', { for: 'report-vpg' }, 'VPG'), vpgSel)), body);
  load();
  let known = '';
  return {
    update(store) {
      // Fill the VPG filter once; refresh the list when a recovery task ends.
      const names = [...store.vpgs.values()].map((v) => `${v.id}=${v.name}`).sort().join('|');
      if (names !== known) {
        known = names;
        const keep = vpgSel.value;
        vpgSel.replaceChildren(h('option', { value: '' }, 'All VPGs'),
          ...[...store.vpgs.values()].sort((a, b) => a.name.localeCompare(b.name)).map((v) => h('option', { value: v.id }, v.name)));
        vpgSel.value = keep;
      }
      const ended = [...store.tasks.values()].filter((t) => t.finished_at && ['failover_test', 'failover', 'move'].includes(t.kind))
        .map((t) => t.id).sort().join(',');
      if (this.ended !== undefined && ended !== this.ended) load();
      this.ended = ended;
    },
    unmount() { gone = true; },
  };
}
