// Dashboard: VPGs by status, open alerts by severity, write throughput, sites and hosts
// with connectivity, RPO of the VPGs nearest their target, running tasks and recent
// events; all from the live stream.

import { h, replace, fmtBytes, fmtAgo, fmtSecs, fmtRate } from '../dom.js';
import { label, values } from '../lookups.js';
import { statusTone, sparkline, rateSparkline, progressBar } from '../components.js';
import { kindWord, taskStateWord, fraction } from '../ops.js';

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
    const total = store.totalThroughput();
    const journals = vpgs.reduce((n, v) => n + v.journal_bytes, 0);
    const running = [...store.tasks.values()].filter((t) => ['pending', 'running', 'waiting'].includes(t.state));
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

    // What the protected VMs write, summed over every VPG (the agents measure it per
    // disk over the last few seconds); the busiest VPGs below.
    const busiest = vpgs.map((v) => ({ v, t: store.throughput.get(v.id) }))
      .filter((x) => x.t && x.t.bytes > 0)
      .sort((a, b) => b.t.bytes - a.t.bytes || a.v.name.localeCompare(b.v.name))
      .slice(0, 5);
    const throughputCard = h('section', { class: 'card', 'aria-labelledby': 'd-throughput' },
      h('h2', { id: 'd-throughput' }, 'Throughput'),
      h('p', { class: 'big' }, h('span', { id: 'throughput-total', dataset: { bytes: total.bytes } }, fmtRate(total.bytes))),
      h('p', {}, h('span', { id: 'iops-total' }, `${Math.round(total.iops)} IOPS`), ' written by protected VMs ',
        rateSparkline(store.totals, 'All VPGs')),
      busiest.length
        ? h('ul', { class: 'rpo-list', id: 'busiest' }, busiest.map(({ v, t }) =>
          h('li', {}, h('a', { href: `#/vpgs/${v.id}` }, v.name), ' ', h('span', { class: 'num' }, fmtRate(t.bytes, t.iops)))))
        : h('p', { class: 'muted' }, 'No VM is writing.'),
      h('p', { class: 'muted' }, 'Journals hold ', h('span', { id: 'journal-total' }, fmtBytes(journals)), ' in all.'));

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
      h('h2', { id: 'd-rpo' }, vpgs.length > worst.length ? `RPO: the ${worst.length} VPGs nearest their target` : 'RPO'),
      h('ul', { class: 'rpo-list' }, worst.map((v) =>
        h('li', {}, h('a', { href: `#/vpgs/${v.id}` }, v.name), ' ',
          h('span', { class: 'num', dataset: { rpoFor: v.name } }, fmtSecs(v.rpo_actual_secs)),
          h('span', { class: 'muted' }, ` / ${fmtSecs(v.settings.rpo_target_secs)}`), ' ',
          sparkline(store.samples.get(v.id) || [], v.settings.rpo_target_secs)))));

    const taskCard = h('section', { class: 'card wide', 'aria-labelledby': 'd-tasks' },
      h('h2', { id: 'd-tasks' }, h('a', { href: '#/events' }, 'Running tasks and recent events')),
      running.length
        ? h('ul', { class: 'tasks' }, running.map((t) => h('li', { dataset: { task: t.id } },
          t.vpg_id ? h('a', { href: `#/vpgs/${t.vpg_id}` }, store.vpgs.get(t.vpg_id)?.name ?? t.vpg_id) : null, ' ',
          `${kindWord(t.kind)}: ${taskStateWord(t).toLowerCase()} `, progressBar(fraction(t.progress), `${kindWord(t.kind)} progress`))))
        : h('p', { class: 'muted' }, 'No task running.'),
      h('ul', { class: 'events', id: 'recent-events' }, store.events.slice(-6).reverse().map((e) =>
        h('li', { class: `sev-${e.severity}` }, h('time', { datetime: e.at }, fmtAgo(e.at)), ' ', e.message))));

    replace(body, statusCard, alertCard, throughputCard, rpoCard, siteCard, taskCard);
  }

  return { update };
}
