// VPG detail: header (status, RPO, throughput, the place for operations), VMs with their
// replication state and per-disk figures (GET /vpgs/{id}/disks), settings, checkpoint timeline with tagging, RPO history chart,
// tasks, alerts and events of this VPG; recovery operations (buttons, dialogs, live
// progress) and the VPG's recovery reports.

import { api, listPage, ApiError } from '../api.js';
import { h, replace, fmtSecs, fmtBytes, fmtRate, fmtTime, fmtAgo, field } from '../dom.js';
import { label } from '../lookups.js';
import { statusBadge, replicationBadge, sparkline, rateSparkline, lineChart, progressBar, problemBox } from '../components.js';
import { createOps, activeOperation, latestOperation, progressPanel, Countdowns, reportTable, fraction, taskStateWord, kindWord } from '../ops.js';

export function mount(root, ctx, { id }) {
  let store = ctx.store;
  let detail = null; // GET /vpgs/{id} (with members)
  let detailVersion = null;
  let vms = new Map();
  let disks = null; // GET /vpgs/{id}/disks, by API disk id
  let checkpoints = null;
  let tagged = null;
  let eventsPage = [];
  let range = 3600;
  const timers = [];
  let gone = false;

  const head = h('div', { class: 'page-head' });
  const summary = h('div', { class: 'summary' });
  const vmSection = h('div', {});
  const settingsSection = h('div', {});
  const cpSection = h('div', {});
  const chartSection = h('div', { id: 'rpo-chart' });
  const tasksSection = h('div', {});
  const alertsSection = h('div', {});
  const eventsSection = h('div', {});
  const loadErr = h('div', {});
  const opSlot = h('div', { id: 'op-slot' });
  const opsStatus = h('p', { class: 'muted ops-status', role: 'status', id: 'ops-status' });
  const reportsSection = h('div', { id: 'vpg-reports' });
  const countdowns = new Countdowns();
  let reports = null;
  let lastFinished = null; // finished_at of the newest recovery task seen, to reload reports
  const DONE_WORDS = {
    'failover-test': 'Failover test started.',
    'stop-test': 'Stopping the failover test.',
    failover: 'Failover started.',
    move: 'Move started.',
    commit: 'Commit started.',
    rollback: 'Rollback started.',
    pause: 'Protection paused.',
    resume: 'Protection resumed.',
    'force-sync': 'Force sync requested.',
  };
  const ops = createOps(ctx, id, {
    getVpg: () => vpgNow(),
    getDetail: () => detail,
    onDone(kind, result) {
      // Show the answer at once; the stream brings the rest.
      if (result?.steps && result.id) store.tasks.set(result.id, result);
      else if (result?.id === id && result.status) store.vpgs.set(id, { ...(store.vpgs.get(id) || {}), ...result });
      opsStatus.textContent = `${DONE_WORDS[kind] || 'Done.'}${result?.steps ? ` Task ${result.id}.` : ''}`;
      renderLive();
    },
  });

  // Tagging form (static, so typing is never interrupted by live updates).
  const tagIn = h('input', { id: 'tag-name', name: 'tag', maxlength: 64, required: true, autocomplete: 'off' });
  const appIn = h('input', { id: 'tag-app', type: 'checkbox' });
  const tagErr = h('div', {});
  const tagMsg = h('p', { class: 'muted', role: 'status', id: 'tag-status' });
  const tagForm = ctx.can('operator')
    ? h('form', { class: 'inline-form', id: 'tag-form', novalidate: true, 'aria-label': 'Tag a checkpoint' },
      field('Tag', tagIn, '1 to 64 characters; written into every journal of the VPG.'),
      h('div', { class: 'field check' }, appIn, h('label', { for: 'tag-app' }, 'App-consistent (quiesce the VMs)')),
      h('button', { type: 'submit', class: 'primary' }, 'Tag checkpoint'),
      tagErr, tagMsg)
    : null;
  tagForm?.addEventListener('submit', async (e) => {
    e.preventDefault();
    const btn = tagForm.querySelector('button');
    btn.disabled = true;
    replace(tagErr);
    tagMsg.textContent = 'Tagging…';
    try {
      const cp = await api(`/vpgs/${id}/checkpoints`, { method: 'POST', body: { tag: tagIn.value, app_consistent: appIn.checked } });
      tagMsg.textContent = `Checkpoint “${cp.tag}” taken at ${fmtTime(cp.taken_at)}.`;
      tagIn.value = '';
      await loadCheckpoints();
    } catch (err) {
      tagMsg.textContent = '';
      replace(tagErr, problemBox(err));
    } finally {
      btn.disabled = false;
    }
  });

  const rangeSel = h('select', { id: 'rpo-range' },
    h('option', { value: '3600' }, 'Last hour'), h('option', { value: '86400' }, 'Last day'));
  rangeSel.addEventListener('change', () => { range = Number(rangeSel.value); loadHistory(); });

  replace(root, head, opsStatus, loadErr, opSlot, summary,
    h('section', { 'aria-labelledby': 's-vms' }, h('h2', { id: 's-vms' }, 'VMs'), vmSection),
    h('section', { 'aria-labelledby': 's-cp' }, h('h2', { id: 's-cp' }, 'Checkpoints'), tagForm, cpSection),
    h('section', { 'aria-labelledby': 's-rpo' }, h('div', { class: 'section-head' }, h('h2', { id: 's-rpo' }, 'RPO history'),
      field('Range', rangeSel)), chartSection),
    h('section', { 'aria-labelledby': 's-reports' }, h('div', { class: 'section-head' }, h('h2', { id: 's-reports' }, 'Recovery reports'),
      h('a', { href: '#/reports' }, 'All reports')), reportsSection),
    h('section', { 'aria-labelledby': 's-tasks' }, h('h2', { id: 's-tasks' }, 'Tasks'), tasksSection),
    h('section', { 'aria-labelledby': 's-alerts' }, h('h2', { id: 's-alerts' }, 'Open alerts'), alertsSection),
    h('section', { 'aria-labelledby': 's-settings' }, h('h2', { id: 's-settings' }, 'Settings'), settingsSection),
    h('section', { 'aria-labelledby': 's-events' }, h('h2', { id: 's-events' }, 'Events'), eventsSection));

  async function loadDetail() {
    try {
      detail = await api(`/vpgs/${id}`);
      detailVersion = detail.version;
      const members = detail.members || [];
      const fetched = await Promise.all(members.map((m) => api(`/vms/${m.vm_id}`).catch(() => null)));
      vms = new Map(fetched.filter(Boolean).map((v) => [v.id, v]));
      replace(loadErr);
      renderLive();
      renderSettings();
    } catch (err) {
      replace(loadErr, problemBox(err));
    }
  }

  async function loadReports() {
    try {
      reports = (await api(`/reports?vpg=${encodeURIComponent(id)}&limit=20`)).items;
    } catch (err) {
      if (!gone) replace(reportsSection, problemBox(err));
      return;
    }
    if (!gone) replace(reportsSection, reportTable(reports, { id: 'vpg-report-table', href: (r) => `#/reports/${r.id}` }));
  }

  async function loadDisks() {
    try {
      disks = new Map((await api(`/vpgs/${id}/disks`)).map((d) => [d.disk_id, d]));
    } catch { disks = null; }
    if (!gone) renderVms();
  }

  async function loadCheckpoints() {
    try {
      const [recent, tags] = await Promise.all([
        listPage(`/vpgs/${id}/checkpoints`, 60),
        listPage(`/vpgs/${id}/checkpoints?tagged=true`, 50),
      ]);
      checkpoints = recent.items;
      tagged = tags.items;
    } catch (err) {
      if (!gone) replace(cpSection, problemBox(err));
      return;
    }
    renderCheckpoints();
  }

  async function loadEvents() {
    try {
      eventsPage = (await listPage(`/events?vpg=${encodeURIComponent(id)}`, 30)).items;
    } catch { eventsPage = []; }
    renderEvents();
  }

  async function loadHistory() {
    const until = new Date();
    const since = new Date(until.getTime() - range * 1000);
    const q = new URLSearchParams({ since: since.toISOString(), until: until.toISOString(), max_points: '240' });
    let data = null;
    try {
      data = await api(`/vpgs/${id}/rpo-history?${q}`);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404 && err.code !== 'vpg.not_found') {
        replace(chartSection, h('p', { class: 'muted', id: 'rpo-history-empty' }, 'No RPO history yet.'));
        return;
      }
      replace(chartSection, problemBox(err));
      return;
    }
    // Buckets without a sample are left out by the manager: break the line there.
    const samples = [];
    const stepMs = Math.max(1, data?.step_secs || 1) * 1000;
    let prev = null;
    for (const p of data?.samples || []) {
      const t = Date.parse(p.at);
      if (prev !== null && t - prev > stepMs * 1.5) samples.push({ at: new Date(prev + stepMs).toISOString(), value: null });
      samples.push({ at: p.at, value: p.rpo_ms === null || p.rpo_ms === undefined ? null : p.rpo_ms / 1000 });
      prev = t;
    }
    if (!samples.some((p) => p.value !== null)) {
      replace(chartSection, h('p', { class: 'muted', id: 'rpo-history-empty' }, 'No RPO history yet.'));
      return;
    }
    const target = (store.vpgs.get(id) || detail)?.settings.rpo_target_secs;
    const width = Math.max(300, Math.round(chartSection.clientWidth || 640));
    replace(chartSection, lineChart(samples, { target, from: since.getTime(), to: until.getTime(), width, height: 200, label: `Actual RPO over the ${range === 3600 ? 'last hour' : 'last day'}, target ${fmtSecs(target)}` }),
      h('p', { class: 'muted' }, `${samples.length} points, one per ${fmtSecs(data.step_secs)}; dashed: target.`));
  }

  function vpgNow() {
    return store.vpgs.get(id) || detail;
  }

  function renderHead() {
    const v = vpgNow();
    if (!v) { replace(head, h('h1', {}, 'VPG')); return; }
    replace(head,
      h('div', {}, h('p', { class: 'crumbs' }, h('a', { href: '#/vpgs' }, 'VPGs'), ' / '),
        h('h1', { id: 'vpg-name' }, v.name), h('div', { id: 'vpg-status' }, statusBadge(v), v.paused ? h('span', { class: 'badge warn' }, 'paused') : null)),
      h('div', { class: 'head-actions' },
        h('div', { class: 'ops', id: 'vpg-ops', role: 'group', 'aria-label': 'Operations' },
          ops.buttons(v, activeOperation(store, id))),
        ctx.can('admin') ? h('a', { class: 'button', href: `#/vpgs/${id}/edit`, id: 'edit-vpg' }, 'Edit') : null));
  }

  function renderSummary() {
    const v = vpgNow();
    if (!v) return;
    const s = v.settings;
    const site = (sid) => (sid ? store.sites.get(sid)?.name ?? sid : '–');
    replace(summary, h('dl', { class: 'stats' },
      h('div', {}, h('dt', {}, 'Sites'), h('dd', {}, `${site(v.protected_site_id)} → ${site(v.recovery_site_id)}`)),
      h('div', {}, h('dt', {}, 'RPO / target'), h('dd', { id: 'vpg-rpo' }, `${fmtSecs(v.rpo_actual_secs)} / ${fmtSecs(s.rpo_target_secs)} `,
        sparkline(store.samples.get(id) || [], s.rpo_target_secs))),
      h('div', {}, h('dt', {}, 'Journal history / target'), h('dd', {}, `${fmtSecs(v.history_actual_secs)} / ${fmtSecs(s.journal_history_secs)}`)),
      h('div', {}, h('dt', {}, 'Journal size'), h('dd', {}, `${fmtBytes(v.journal_bytes)} (warning ${fmtBytes(s.journal_warning_bytes)}, limit ${fmtBytes(s.journal_hard_limit_bytes)})`)),
      h('div', {}, h('dt', {}, 'Throughput'), h('dd', { id: 'vpg-throughput' },
        (() => { const t = store.throughput.get(id); return t ? fmtRate(t.bytes, t.iops) : '–'; })(), ' ',
        rateSparkline((store.samples.get(id) || []).map((p) => ({ at: p.at, bytes: p.throughput })), 'Throughput'))),
      h('div', {}, h('dt', {}, 'VMs'), h('dd', {}, String(v.vm_count))),
      h('div', {}, h('dt', {}, 'Last failover test'), h('dd', {}, v.last_test_at ? fmtTime(v.last_test_at) : 'never'))));
  }

  function renderVms() {
    if (!detail) { replace(vmSection, h('p', { class: 'muted' }, 'Loading…')); return; }
    const members = detail.members || [];
    if (!members.length) { replace(vmSection, h('p', { class: 'muted' }, 'This VPG has no VMs.')); return; }
    const hostName = (hid) => (hid ? store.hosts.get(hid)?.name ?? hid : '–');
    replace(vmSection, h('div', { class: 'table-wrap' }, h('table', { class: 'grid', id: 'vm-table' },
      h('thead', {}, h('tr', {}, ['VM', 'Replication', 'Power', 'Protected host', 'Recovery host', 'Boot group', 'Disks: mode, lag, writes, sync']
        .map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, members.map((m) => {
        const vm = vms.get(m.vm_id);
        const host = vm ? hostName(vm.host_id) : '–';
        return h('tr', { dataset: { vm: m.vm_name } },
          h('th', { scope: 'row', 'data-label': 'VM' }, m.vm_name),
          h('td', { 'data-label': 'Replication' }, replicationBadge(vm?.replication_state ?? m.replication_state)),
          h('td', { 'data-label': 'Power' }, vm ? label('power_states', vm.power_state) : '–'),
          h('td', { 'data-label': 'Protected host' }, host),
          h('td', { 'data-label': 'Recovery host' }, hostName(m.recovery_host_id)),
          h('td', { 'data-label': 'Boot group', class: 'num' }, `${m.boot_group}${m.boot_delay_secs ? ` (+${m.boot_delay_secs} s)` : ''}`),
          h('td', { 'data-label': 'Disks' }, vm ? h('ul', { class: 'disks' }, vm.disks.map((d) => diskItem(d, disks?.get(d.id)))) : '–'));
      })))));
  }

  /** One disk: size, then what its protected host reports now. */
  function diskItem(d, live) {
    const figures = [];
    if (!live || !live.reported) {
      figures.push(h('span', { class: 'muted' }, disks ? ' not reported by its host' : ' no live figures'));
    } else {
      const sync = live.sync;
      figures.push(
        h('span', { class: `badge ${live.mode === 'streaming' ? 'ok' : 'warn'}`, dataset: { mode: live.mode } }, label('replication_modes', live.mode)),
        h('span', { class: 'muted' }, ` lag ${fmtSecs(live.lag_secs)}`,
          live.queued_bytes ? `, queued ${fmtBytes(live.queued_bytes)}` : '',
          live.dirty_bytes ? `, dirty ${fmtBytes(live.dirty_bytes)}` : '', ' · '),
        h('span', { class: 'num', dataset: { throughput: live.throughput_bytes_per_sec } }, fmtRate(live.throughput_bytes_per_sec, live.iops)));
      if (sync?.running) {
        const r = sync.running;
        figures.push(h('span', { class: 'sync', dataset: { syncKind: r.kind } }, ` ${label('sync_kinds', r.kind)} `,
          progressBar(r.percent / 100, `${d.name} ${label('sync_kinds', r.kind)} progress`),
          h('span', { class: 'muted' }, [r.bytes_per_sec ? ` ${fmtRate(r.bytes_per_sec)}` : '', r.eta_secs !== null ? `, ${fmtSecs(r.eta_secs)} left` : ''].join(''))));
      } else if (sync && sync.phase !== 'idle') {
        figures.push(h('span', { class: sync.phase === 'failed' ? 'bad-text' : 'warn-text', title: sync.detail || '' },
          ` sync ${label('sync_phases', sync.phase).toLowerCase()}${sync.detail ? `: ${sync.detail}` : ''}`));
      }
    }
    return h('li', { dataset: { disk: d.name } }, h('strong', {}, d.name), ` (${fmtBytes(d.size_bytes)}) `, ...figures);
  }

  function renderSettings() {
    const v = detail;
    if (!v) return;
    const s = v.settings;
    const rows = [
      ['RPO target', fmtSecs(s.rpo_target_secs)],
      ['Journal history', fmtSecs(s.journal_history_secs)],
      ['Journal warning / hard limit', `${fmtBytes(s.journal_warning_bytes)} / ${fmtBytes(s.journal_hard_limit_bytes)}`],
      ['Checkpoint interval', fmtSecs(s.checkpoint_interval_ms / 1000)],
      ['Compression', s.compression ? 'on' : 'off'],
      ['Priority', label('priorities', s.priority)],
      ['Test reminder', s.test_reminder_days ? `${s.test_reminder_days} days` : 'off'],
      ['Resync policy', label('resync_modes', s.resync_policy.mode) + (s.resync_policy.mode === 'window' ? ` ${s.resync_policy.start}–${s.resync_policy.end}` : '')],
      ['Failover network', s.failover_network || '–'],
      ['Test network', s.test_network || '–'],
      ['Network mappings', s.network_mappings.length ? s.network_mappings.map((m) => `${m.from} → ${m.to}`).join(', ') : '–'],
      ['Description', v.description || '–'],
    ];
    replace(settingsSection, h('dl', { class: 'settings' }, rows.map(([k, val]) => h('div', {}, h('dt', {}, k), h('dd', {}, val)))));
  }

  function renderCheckpoints() {
    if (!checkpoints) { replace(cpSection, h('p', { class: 'muted' }, 'Loading…')); return; }
    const all = new Map();
    for (const c of [...checkpoints, ...(tagged || [])]) all.set(c.id, c);
    const list = [...all.values()].sort((a, b) => Date.parse(a.taken_at) - Date.parse(b.taken_at));
    if (!list.length) { replace(cpSection, h('p', { class: 'muted' }, 'No checkpoint yet.')); return; }
    const t0 = Date.parse(list[0].taken_at);
    const t1 = Math.max(Date.parse(list[list.length - 1].taken_at), t0 + 1);
    const pos = (c) => ((Date.parse(c.taken_at) - t0) / (t1 - t0)) * 100;
    const timeline = h('div', { class: 'timeline', role: 'img',
      'aria-label': `${list.length} checkpoints from ${fmtTime(list[0].taken_at)} to ${fmtTime(list[list.length - 1].taken_at)}; ${list.filter((c) => c.recoverable).length} recoverable` },
    list.map((c) => h('span', { class: `tick ${c.recoverable ? 'rec' : 'unrec'} ${c.tag ? 'tagged' : ''}`, style: `left:${pos(c).toFixed(2)}%`,
      title: `${fmtTime(c.taken_at)} ${label('checkpoint_kinds', c.kind)}${c.tag ? ` “${c.tag}”` : ''}${c.recoverable ? '' : ' (not recoverable)'}` },
    c.tag ? h('span', { class: `tag ${pos(c) > 80 ? 'end' : pos(c) < 20 ? 'start' : ''}` }, c.tag) : null)));
    const rows = [...(tagged || []), ...checkpoints.slice(0, 12)];
    const seen = new Set();
    const shown = rows.filter((c) => (seen.has(c.id) ? false : seen.add(c.id))).sort((a, b) => Date.parse(b.taken_at) - Date.parse(a.taken_at));
    replace(cpSection,
      h('div', { class: 'legend muted' }, h('span', { class: 'tick-key rec' }), ' recoverable ', h('span', { class: 'tick-key unrec' }), ' not recoverable (yet) ',
        h('span', { class: 'tick-key tagged' }), ' tagged'),
      timeline,
      h('div', { class: 'table-wrap' }, h('table', { class: 'grid', id: 'cp-table' },
        h('caption', { class: 'sr-only' }, 'Tagged and most recent checkpoints'),
        h('thead', {}, h('tr', {}, ['Taken', 'Kind', 'Tag', 'Recoverable'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, shown.map((c) => h('tr', { dataset: { checkpoint: c.id, tag: c.tag || '' } },
          h('td', { 'data-label': 'Taken' }, h('time', { datetime: c.taken_at }, fmtTime(c.taken_at))),
          h('td', { 'data-label': 'Kind' }, label('checkpoint_kinds', c.kind)),
          h('td', { 'data-label': 'Tag' }, c.tag || ''),
          h('td', { 'data-label': 'Recoverable' }, c.recoverable ? 'yes' : 'no')))))));
  }

  function renderTasks() {
    const tasks = [...store.tasks.values()].filter((t) => t.vpg_id === id)
      .sort((a, b) => Date.parse(b.created_at) - Date.parse(a.created_at)).slice(0, 10);
    replace(tasksSection, tasks.length ? h('ul', { class: 'tasks' }, tasks.map((t) => h('li', { dataset: { task: t.id } },
      h('strong', {}, kindWord(t.kind)), ` ${t.finished_at ? label('task_states', t.state) : taskStateWord(t)} `, progressBar(fraction(t.progress), `${t.kind} progress`),
      t.steps[t.current_step] ? h('span', { class: 'muted' }, ` ${t.steps[t.current_step].name}`) : null,
      t.error ? h('span', { class: 'bad-text' }, ` ${t.error}`) : null)))
      : h('p', { class: 'muted' }, 'No recent task for this VPG.'));
  }

  function renderAlerts() {
    const open = store.openAlerts().filter((a) => a.vpg_id === id);
    replace(alertsSection, open.length ? h('ul', { class: 'alerts-mini' }, open.map((a) => h('li', {},
      h('span', { class: `badge sev-${a.severity}` }, label('alert_severities', a.severity)), ' ', a.message,
      a.acknowledged_at ? h('span', { class: 'muted' }, ` (acknowledged by ${a.acknowledged_by})`) : null)))
      : h('p', { class: 'muted' }, 'No open alert.'), h('p', {}, h('a', { href: '#/alerts' }, 'All alerts')));
  }

  function renderEvents() {
    const byId = new Map(eventsPage.map((e) => [e.id, e]));
    for (const e of store.events) if (e.vpg_id === id) byId.set(e.id, e);
    const list = [...byId.values()].sort((a, b) => b.id - a.id).slice(0, 30);
    replace(eventsSection, list.length ? h('ul', { class: 'events' }, list.map((e) => h('li', { class: `sev-${e.severity}` },
      h('time', { datetime: e.at, title: fmtTime(e.at) }, fmtAgo(e.at)), ' ', e.message, h('span', { class: 'muted' }, ` — ${e.actor}`))))
      : h('p', { class: 'muted' }, 'No event.'));
  }

  /** The running operation, or the last one for five minutes after it ended. */
  function renderOperation() {
    let t = activeOperation(store, id);
    const last = latestOperation(store, id);
    if (!t && last?.finished_at && Date.now() - Date.parse(last.finished_at) < 300_000) t = last;
    // A recovery task that ended has written its report: list it.
    if (store.hasSnapshot) {
      const key = last?.finished_at ? `${last.id}@${last.finished_at}` : '';
      if (lastFinished !== null && key !== lastFinished) loadReports();
      lastFinished = key;
    }
    replace(opSlot, t ? h('section', { 'aria-labelledby': 's-op' }, progressPanel(t, countdowns)) : null);
  }

  function renderLive() {
    renderHead();
    renderOperation();
    renderSummary();
    renderVms();
    renderTasks();
    renderAlerts();
    renderEvents();
  }

  const every = (fn, ms) => { fn(); timers.push(setInterval(fn, ms)); };
  loadDetail();
  every(loadDisks, 2000);
  every(loadCheckpoints, 5000);
  every(loadHistory, 15000);
  loadEvents();
  loadReports();
  renderLive();
  // The countdown of a commit policy or a test's time box ticks between stream frames.
  timers.push(setInterval(() => {
    const t = activeOperation(store, id);
    if (t?.details?.countdown_secs !== null && t?.details?.countdown_secs !== undefined) renderOperation();
  }, 1000));

  return {
    update(s) {
      store = s;
      const v = s.vpgs.get(id);
      if (v && detailVersion !== null && v.version !== detailVersion) { detailVersion = v.version; loadDetail(); }
      if (s.hasSnapshot && !v && detail) replace(loadErr, h('p', { class: 'problem', role: 'alert' }, 'This VPG no longer exists.'));
      renderLive();
    },
    unmount() { gone = true; timers.forEach(clearInterval); },
  };
}
