// Dashboard: VPGs by status, open alerts by severity, sites and hosts with
// connectivity, journal growth, running tasks and recent events; all from the live stream.

import { h, replace, fmtBytes, fmtAgo, fmtSecs } from '../dom.js';
import { label, values } from '../lookups.js';
import { statusTone, sparkline, progressBar } from '../components.js';

/** Sum over VPGs of the journal growth over the last `windowSecs` of samples (bytes/s). */
function journalGrowth(store, windowSecs = 60) {
  let rate = 0;
  let seen = false;
  for (const list of store.samples.values()) {
    if (list.length < 2) continue;
    const last = list[list.length - 1];
    const tEnd = Date.parse(last.at);
    let first = list[0];
    for (const p of list) { if (tEnd - Date.parse(p.at) <= windowSecs * 1000) { first = p; break; } }
    const dt = (tEnd - Date.parse(first.at)) / 1000;
    if (dt <= 0) continue;
    rate += (last.journal - first.journal) / dt;
    seen = true;
  }
  return seen ? rate : null;
}

export function mount(root, ctx) {
  const body = h('div', { class: 'dash' });
  replace(root, h('h1', {}, 'Dashboard'), body);

  function update(store) {
    const vpgs = [...store.vpgs.values()];
    const byStatus = new Map();
    for (const v of vpgs) byStatus.set(v.status, (byStatus.get(v.status) || 0) + 1);
    const open = store.openAlerts();
    const bySev = new Map();
    for (const a of open) bySev.set(a.severity, (bySev.get(a.severity) || 0) + 1);
    const growth = journalGrowth(store);
    const running = [...store.tasks.values()].filter((t) => t.state === 'running' || t.state === 'pending');
    const vmCount = vpgs.reduce((n, v) => n + v.vm_count, 0);

    const statusCard = h('section', { class: 'card', 'aria-labelledby': 'd-vpgs' },
      h('h2', { id: 'd-vpgs' }, h('a', { href: '#/vpgs' }, 'VPGs')),
      h('p', { class: 'big' }, h('span', { id: 'vpg-total' }, String(vpgs.length)), ' VPGs, ',
        h('span', { id: 'vm-total' }, String(vmCount)), ' VMs'),
      h('ul', { class: 'counts', id: 'vpg-counts' },
        values('vpg_statuses').map((st) => {
          const n = byStatus.get(st.id) || 0;
          return h('li', { class: n ? '' : 'zero', dataset: { status: st.id, count: n } },
            h('span', { class: `badge ${statusTone(st.id)}` }, st.label), h('span', { class: 'n' }, String(n)));
        })));

    const alertCard = h('section', { class: 'card', 'aria-labelledby': 'd-alerts' },
      h('h2', { id: 'd-alerts' }, h('a', { href: '#/alerts' }, 'Open alerts')),
      h('p', { class: 'big' }, h('span', { id: 'alert-total' }, String(open.length))),
      h('ul', { class: 'counts', id: 'alert-counts' },
        values('alert_severities').map((sv) => {
          const n = bySev.get(sv.id) || 0;
          return h('li', { class: n ? '' : 'zero', dataset: { severity: sv.id, count: n } },
            h('span', { class: `badge sev-${sv.id}` }, sv.label), h('span', { class: 'n' }, String(n)));
        })));

    const hostsBySite = new Map();
    for (const host of store.hosts.values()) {
      if (!hostsBySite.has(host.site_id)) hostsBySite.set(host.site_id, []);
      hostsBySite.get(host.site_id).push(host);
    }
    const siteCard = h('section', { class: 'card wide', 'aria-labelledby': 'd-sites' },
      h('h2', { id: 'd-sites' }, 'Sites and hosts'),
      h('div', { class: 'sites', id: 'sites' },
        [...store.sites.values()].sort((a, b) => a.name.localeCompare(b.name)).map((site) => {
          const hosts = (hostsBySite.get(site.id) || []).sort((a, b) => a.name.localeCompare(b.name));
          const up = hosts.filter((x) => x.connectivity === 'connected').length;
          return h('div', { class: 'site', dataset: { site: site.name } },
            h('h3', {}, site.name, ' ', h('small', {}, `${up}/${hosts.length} hosts connected`)),
            h('ul', { class: 'hosts' }, hosts.map((x) => h('li', { dataset: { host: x.name, connectivity: x.connectivity } },
              h('span', { class: `dot ${x.connectivity}`, 'aria-hidden': 'true' }),
              x.name, ' ', h('span', { class: 'muted' }, label('connectivity', x.connectivity)),
              x.last_seen_at ? h('span', { class: 'muted' }, ` · seen ${fmtAgo(x.last_seen_at)}`) : null))));
        })));

    // The VPGs closest to (or past) their RPO target first; at most ten.
    const ratio = (v) => (v.rpo_actual_secs === null ? Infinity : v.rpo_actual_secs / v.settings.rpo_target_secs);
    const worst = [...vpgs].sort((a, b) => ratio(b) - ratio(a) || a.name.localeCompare(b.name)).slice(0, 10);
    const rpoCard = h('section', { class: 'card wide', 'aria-labelledby': 'd-rpo' },
      h('h2', { id: 'd-rpo' }, vpgs.length > worst.length ? `RPO: the ${worst.length} VPGs nearest their target` : 'RPO and journals'),
      h('p', {}, 'Journal growth, all VPGs (last minute of stream samples): ',
        h('strong', { id: 'journal-growth' }, growth === null ? '–' : `${fmtBytes(Math.abs(growth))}/s${growth < 0 ? ' (shrinking)' : ''}`)),
      h('ul', { class: 'rpo-list' }, worst.map((v) =>
        h('li', {}, h('a', { href: `#/vpgs/${v.id}` }, v.name), ' ',
          h('span', { class: 'num', dataset: { rpoFor: v.name } }, fmtSecs(v.rpo_actual_secs)),
          h('span', { class: 'muted' }, ` / ${fmtSecs(v.settings.rpo_target_secs)}`), ' ',
          sparkline(store.samples.get(v.id) || [], v.settings.rpo_target_secs)))));

    const taskCard = h('section', { class: 'card wide', 'aria-labelledby': 'd-tasks' },
      h('h2', { id: 'd-tasks' }, h('a', { href: '#/events' }, 'Running tasks and recent events')),
      running.length
        ? h('ul', { class: 'tasks' }, running.map((t) => h('li', {}, `${t.kind} `, progressBar(t.progress, `${t.kind} progress`))))
        : h('p', { class: 'muted' }, 'No task running.'),
      h('ul', { class: 'events', id: 'recent-events' }, store.events.slice(-6).reverse().map((e) =>
        h('li', { class: `sev-${e.severity}` }, h('time', { datetime: e.at }, fmtAgo(e.at)), ' ', e.message))));

    replace(body, statusCard, alertCard, rpoCard, siteCard, taskCard);
  }

  return { update };
}
