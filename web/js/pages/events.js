// Events and tasks: tasks with live progress bars and steps, and the audit log (live
// events first, older ones page by page from REST).

import { listPage } from '../api.js';
import { h, replace, fmtTime, fmtAgo, field } from '../dom.js';
import { progressBar, problemBox } from '../components.js';
import { kindWord, stepWord, taskStateWord, fraction } from '../ops.js';

export function mount(root, ctx) {
  let store = ctx.store;
  let older = [];
  let cursor = null;
  let loadedOnce = false;
  const tasksEl = h('div', { id: 'tasks' });
  const eventsEl = h('div', { id: 'events' });
  const errSlot = h('div', {});
  const sevSel = h('select', { id: 'event-severity' }, h('option', { value: '' }, 'Any severity'),
    ['info', 'warning', 'error'].map((s) => h('option', { value: s }, s)));
  const kindIn = h('input', { id: 'event-kind', type: 'search', autocomplete: 'off' });
  const more = h('button', { type: 'button', id: 'more-events' }, 'Load older events');
  sevSel.addEventListener('change', () => render());
  kindIn.addEventListener('input', () => render());
  more.addEventListener('click', () => loadOlder());

  replace(root, h('h1', {}, 'Events and tasks'), errSlot,
    h('section', { 'aria-labelledby': 'e-tasks' }, h('h2', { id: 'e-tasks' }, 'Tasks'), tasksEl),
    h('section', { 'aria-labelledby': 'e-events' }, h('h2', { id: 'e-events' }, 'Events'),
      h('form', { class: 'filters', 'aria-label': 'Filter events', onsubmit: (e) => e.preventDefault() },
        field('Severity', sevSel), field('Kind contains', kindIn)),
      eventsEl, more));

  async function loadOlder() {
    more.disabled = true;
    try {
      const page = await listPage(`/events${cursor ? `?cursor=${encodeURIComponent(cursor)}` : ''}`, 50);
      older.push(...page.items);
      cursor = page.next_cursor;
      loadedOnce = true;
      more.hidden = !cursor;
    } catch (err) {
      replace(errSlot, problemBox(err));
    }
    more.disabled = false;
    render();
  }

  function render() {
    const tasks = [...store.tasks.values()].sort((a, b) => Date.parse(b.created_at) - Date.parse(a.created_at));
    replace(tasksEl, tasks.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'grid', id: 'task-table' },
      h('thead', {}, h('tr', {}, ['Task', 'VPG', 'State', 'Progress', 'Step', 'Started', 'By'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, tasks.map((t) => h('tr', { dataset: { task: t.id, state: t.state } },
        h('th', { scope: 'row', 'data-label': 'Task' }, kindWord(t.kind)),
        h('td', { 'data-label': 'VPG' }, t.vpg_id ? h('a', { href: `#/vpgs/${t.vpg_id}` }, store.vpgs.get(t.vpg_id)?.name ?? t.vpg_id) : '–'),
        h('td', { 'data-label': 'State' }, taskStateWord(t), t.error ? h('div', { class: 'bad-text' }, t.error) : null),
        h('td', { 'data-label': 'Progress' }, progressBar(fraction(t.progress), `${kindWord(t.kind)} progress`)),
        h('td', { 'data-label': 'Step' }, t.steps.length ? `${Math.min(t.current_step + 1, t.steps.length)}/${t.steps.length} ${stepWord(t.steps[Math.min(t.current_step, t.steps.length - 1)]?.name ?? '')}` : '–'),
        h('td', { 'data-label': 'Started', class: 'when' }, t.started_at ? h('time', { datetime: t.started_at, title: fmtTime(t.started_at) }, fmtAgo(t.started_at)) : '–'),
        h('td', { 'data-label': 'By' }, t.created_by))))))
      : h('p', { class: 'muted' }, 'No task yet. Operations (failover test, failover, move, …) appear here with their progress.'));

    const byId = new Map(older.map((e) => [e.id, e]));
    for (const e of store.events) byId.set(e.id, e);
    const kind = kindIn.value.trim().toLowerCase();
    const list = [...byId.values()]
      .filter((e) => !sevSel.value || e.severity === sevSel.value)
      .filter((e) => !kind || e.kind.toLowerCase().includes(kind))
      .sort((a, b) => b.id - a.id).slice(0, 300);
    replace(eventsEl, list.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'grid', id: 'event-table' },
      h('thead', {}, h('tr', {}, ['When', 'Severity', 'Kind', 'Message', 'Who'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, list.map((e) => h('tr', { dataset: { event: e.id } },
        h('td', { 'data-label': 'When', class: 'when' }, h('time', { datetime: e.at, title: fmtTime(e.at) }, fmtAgo(e.at))),
        h('td', { 'data-label': 'Severity' }, h('span', { class: `badge sev-${e.severity}` }, e.severity)),
        h('td', { 'data-label': 'Kind' }, h('code', {}, e.kind)),
        h('td', { 'data-label': 'Message' }, e.message),
        h('td', { 'data-label': 'Who' }, e.actor))))))
      : h('p', { class: 'muted' }, loadedOnce ? 'No event matches.' : 'Loading…'));
  }
  loadOlder();

  return { update(s) { store = s; render(); } };
}
