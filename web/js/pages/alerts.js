// Alerts: open alerts from the live stream (acknowledge needs the operator role), and
// the recently cleared ones from REST.

import { api, listPage } from '../api.js';
import { h, replace, fmtTime, fmtAgo, field } from '../dom.js';
import { label, values } from '../lookups.js';
import { problemBox } from '../components.js';

export function mount(root, ctx) {
  let store = ctx.store;
  let cleared = [];
  const sevSel = h('select', { id: 'alert-severity' }, h('option', { value: '' }, 'Any severity'),
    values('alert_severities').map((s) => h('option', { value: s.id }, s.label)));
  const unackIn = h('input', { type: 'checkbox', id: 'alert-unacked' });
  const errSlot = h('div', {});
  const openList = h('div', { id: 'open-alerts' });
  const clearedList = h('div', { id: 'cleared-alerts' });
  sevSel.addEventListener('change', () => render());
  unackIn.addEventListener('change', () => render());

  replace(root, h('h1', {}, 'Alerts'),
    h('form', { class: 'filters', 'aria-label': 'Filter alerts', onsubmit: (e) => e.preventDefault() },
      field('Severity', sevSel), h('div', { class: 'field check' }, unackIn, h('label', { for: 'alert-unacked' }, 'Only unacknowledged'))),
    errSlot,
    h('section', { 'aria-labelledby': 'a-open' }, h('h2', { id: 'a-open' }, 'Open'), openList),
    h('section', { 'aria-labelledby': 'a-cleared' }, h('h2', { id: 'a-cleared' }, 'Recently cleared'), clearedList));

  async function ack(a, btn) {
    btn.disabled = true;
    replace(errSlot);
    try {
      const updated = await api(`/alerts/${a.id}/acknowledge`, { method: 'POST' });
      store.alerts.set(updated.id, updated);
      render();
    } catch (err) {
      replace(errSlot, problemBox(err));
      btn.disabled = false;
    }
  }

  function subject(a) {
    if (a.vpg_id) {
      const v = store.vpgs.get(a.vpg_id);
      return h('a', { href: `#/vpgs/${a.vpg_id}` }, v ? v.name : a.vpg_id);
    }
    if (a.host_id) return store.hosts.get(a.host_id)?.name ?? a.host_id;
    if (a.site_id) return store.sites.get(a.site_id)?.name ?? a.site_id;
    return '–';
  }

  function render() {
    const open = store.openAlerts()
      .filter((a) => !sevSel.value || a.severity === sevSel.value)
      .filter((a) => !unackIn.checked || !a.acknowledged_at)
      .sort((a, b) => Date.parse(b.raised_at) - Date.parse(a.raised_at));
    replace(openList, open.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'grid', id: 'alert-table' },
      h('thead', {}, h('tr', {}, ['Severity', 'Alert', 'Subject', 'Raised', 'Acknowledged', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, open.map((a) => h('tr', { dataset: { alert: a.id, kind: a.kind } },
        h('td', { 'data-label': 'Severity' }, h('span', { class: `badge sev-${a.severity}` }, label('alert_severities', a.severity))),
        h('td', { 'data-label': 'Alert' }, a.message, h('div', { class: 'muted' }, h('code', {}, a.kind), a.affected_count > 1 ? ` · ${a.affected_count} affected` : '')),
        h('td', { 'data-label': 'Subject' }, subject(a)),
        h('td', { 'data-label': 'Raised' }, h('time', { datetime: a.raised_at, title: fmtTime(a.raised_at) }, fmtAgo(a.raised_at))),
        h('td', { 'data-label': 'Acknowledged', class: 'acked' }, a.acknowledged_at ? `${a.acknowledged_by}, ${fmtAgo(a.acknowledged_at)}` : 'no'),
        h('td', {}, !a.acknowledged_at && ctx.can('operator')
          ? h('button', { type: 'button', class: 'ack', 'aria-label': `Acknowledge: ${a.message}`, onclick: (e) => ack(a, e.currentTarget) }, 'Acknowledge')
          : null))))))
      : h('p', { class: 'muted' }, store.hasSnapshot ? 'No open alert.' : 'Loading…'));
    replace(clearedList, cleared.length ? h('ul', { class: 'events' }, cleared.map((a) => h('li', {},
      h('span', { class: `badge sev-${a.severity}` }, label('alert_severities', a.severity)), ' ', a.message,
      h('span', { class: 'muted' }, ` — raised ${fmtTime(a.raised_at)}, cleared ${fmtTime(a.cleared_at)}`))))
      : h('p', { class: 'muted' }, 'None.'));
  }

  async function loadCleared() {
    try {
      cleared = (await listPage('/alerts?open=false', 20)).items;
    } catch (err) {
      replace(errSlot, problemBox(err));
    }
    render();
  }
  loadCleared();
  let lastOpen = store.openAlerts().length;

  return {
    update(s) {
      store = s;
      const n = s.openAlerts().length;
      if (n < lastOpen) loadCleared();
      lastOpen = n;
      render();
    },
  };
}
